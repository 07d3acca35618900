"""bench/model.py and bench/scaling.py at tiny sizes: the JSON has the promised shape and its numbers add up.

Run time: about 30 s on 2 cores (every system's tiny config, one torch thread).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import model as model_bench
from bench import scaling
from bench.common import random_boxes, random_vocabulary
from bench.systems import SYSTEMS

REPO = Path(__file__).resolve().parents[2]
TINY = ["--tiny", "--threads", "1", "--matmul-size", "256", "--repeats", "2"]


def test_model_benchmark_every_system(tmp_path):
    out = tmp_path / "model.json"
    assert model_bench.main([*TINY, "--precisions", "fp32", "--boxes", "1,3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r) >= {"ceilings", "rows", "machine", "settings", "errors"}
    assert r["errors"] == []
    assert set(r["ceilings"]) == {"fp32", "bf16"} and all(v > 0 for v in r["ceilings"].values())
    assert {"cpu", "date", "torch", "cpu_count"} <= set(r["machine"])
    assert [(row["system"], row["boxes"]) for row in r["rows"]] == [(s, n) for s in SYSTEMS for n in (1, 3)]
    for row in r["rows"]:
        assert row["precision"] == "fp32" and row["batch"] == 1
        assert row["gflops"] == pytest.approx(row["gflops_image"] + row["gflops_boxes"])
        assert row["floor_s"] == pytest.approx(row["gflops"] / r["ceilings"]["fp32"])
        assert row["ratio"] == pytest.approx(row["p50_s"] / row["floor_s"])
        assert 0 < row["p50_s"] <= row["p90_s"] and len(row["samples_s"]) == 2
        assert row["params_m"] > 0 and row["stages"] and all(v >= 0 for v in row["stages"].values())
    by = {(row["system"], row["boxes"]): row for row in r["rows"]}
    for s in SYSTEMS:
        # one image side for both box counts; the per-box part grows with the boxes
        assert by[s, 1]["gflops_image"] == by[s, 3]["gflops_image"] > 0
        assert by[s, 3]["gflops_boxes"] > 2.5 * by[s, 1]["gflops_boxes"] > 0
    assert {"encode_images", "trunk", "neck", "fpn", "decode+recognition", "masks+labels"} == set(
        by["ovsam-rn50x16", 1]["stages"])
    assert {"sam_encoder", "sam_decode", "crops", "clip_crops", "classify"} == set(by["image-crop", 1]["stages"])
    assert {"sam_encoder", "clip_trunk", "sam_decode", "mask_pool+proj", "classify"} == set(by["feature-crop", 1]["stages"])
    # a CLIP pass per crop costs far more per box than pooling the one trunk pass's features
    assert by["image-crop", 3]["gflops_boxes"] > 5 * by["feature-crop", 3]["gflops_boxes"]


def test_model_benchmark_precisions_and_batch(tmp_path):
    out = tmp_path / "model.json"
    assert model_bench.main([*TINY, "--systems", "ovsam-rn50x16", "--precisions", "bf16,fp32", "--boxes", "2",
                             "--batch", "1,2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = {(row["precision"], row["batch"]): row for row in r["rows"]}
    assert set(rows) == {("fp32", 1), ("bf16", 1), ("fp32", 2), ("bf16", 2)}
    for batch in (1, 2):
        # FLOPs do not depend on the precision; each row's floor uses its own precision's ceiling
        assert rows["bf16", batch]["gflops"] == rows["fp32", batch]["gflops"]
        assert rows["bf16", batch]["floor_s"] == pytest.approx(rows["bf16", batch]["gflops"] / r["ceilings"]["bf16"])
    # (image 2 has other boxes, and what the boxes cost depends a little on their sizes)
    assert rows["fp32", 2]["gflops"] == pytest.approx(2 * rows["fp32", 1]["gflops"], rel=1e-3)
    assert rows["fp32", 2]["images_per_s"] == pytest.approx(2 / rows["fp32", 2]["p50_s"])


def test_scaling_benchmark(tmp_path):
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    assert scaling.main(["--tiny", "--threads", "1", "--precision", "fp32", "--boxes", "1,3", "--vocabularies",
                         "80,1000", "--repeats", "1", "--json", str(out), "--plot", str(png)]) == 0
    r = json.loads(out.read_text())
    assert r["image"]["gflops"] > 0 and r["image"]["p50_s"] > 0
    assert [(v["classes"], v["prototypes"]) for v in r["vocabularies"]] == [(80, 1), (1000, 1)]
    for v in r["vocabularies"]:
        assert [row["boxes"] for row in v["rows"]] == [1, 3]
        for row in v["rows"]:
            assert row["total_gflops"] == pytest.approx(r["image"]["gflops"] + row["boxes_gflops"])
        assert v["per_box"]["gflops"] == pytest.approx((v["rows"][1]["boxes_gflops"] - v["rows"][0]["boxes_gflops"]) / 2)
    inc = r["per_box_increase"]
    assert (inc["from_classes"], inc["to_classes"]) == (80, 1000)
    small, large = (v["per_box"]["gflops"] for v in r["vocabularies"])
    assert inc["gflops"] == pytest.approx(large / small - 1) and inc["gflops"] > 0  # more classes cost more
    assert inc["gflops_ok"] == (inc["gflops"] <= 0.05)
    if importlib.util.find_spec("matplotlib") is not None:  # the test extra's; without it the plot is skipped
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()


def test_random_vocabulary_and_boxes():
    v = random_vocabulary("coco", 8, "clip")
    assert (len(v), v.num_prototypes, v.dim) == (80, 17, 8)
    # classes with fewer synonyms than P repeat their first prototype, as Vocabulary.from_names pads them
    short = next(i for i, s in enumerate(v.synonyms) if len(s) == 1)
    assert bool((v.embeddings[short] == v.embeddings[short, :1]).all())
    assert random_vocabulary(5, 4, "clip", prototypes=3).embeddings.shape == (5, 3, 4)
    b = random_boxes(50, (192, 256), seed=1)
    assert b.shape == (50, 4) and bool((b[:, 2:] > b[:, :2]).all())
    assert float(b[:, 2].max()) <= 256 and float(b[:, 3].max()) <= 192 and float(b.min()) >= 0
    assert bool((random_boxes(50, (192, 256), seed=1) == b).all())


def test_bad_arguments_are_reported(capsys):
    assert model_bench.main(["--tiny", "--systems", "ovsam-rn50"]) == 1
    assert "unknown system(s) ['ovsam-rn50']" in capsys.readouterr().err
    assert model_bench.main(["--tiny", "--boxes", "0"]) == 1
    assert scaling.main(["--tiny", "--vocabularies", "klingon"]) == 1
    assert "--vocabulary expects a class count or one of" in capsys.readouterr().err


def test_scripts_run_from_a_file_path():
    """`python bench/model.py` and `python bench/scaling.py` find the project's packages from the repository root."""
    for script in ("bench/model.py", "bench/scaling.py"):
        proc = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "--json" in proc.stdout


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The benchmarks set torch's thread count for their run (``--threads``); later tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
