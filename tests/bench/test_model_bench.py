"""bench/model.py and bench/scaling.py at tiny sizes: the JSON has the promised shape and its numbers add up.

Run time: about 40 s on 2 cores (every system's tiny config, the open-world ones included, one torch thread).
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
from bench import open_world, scaling
from bench.common import random_boxes, random_vocabulary
from bench.systems import SYSTEMS

REPO = Path(__file__).resolve().parents[2]
TINY = ["--tiny", "--threads", "1", "--matmul-size", "256", "--repeats", "2"]
# the open-world systems: 5 boxes; at most 8 repeated calls (Grounding DINO's 80-class captions all run, its 1,203-class
# ones and SAM 3's concept batches are extrapolated); an 8 x 8 grid (one decoder call)
OPEN_WORLD = ["--classes", "80,1203", "--detections", "5", "--max-calls", "8", "--grid-points", "8"]


@pytest.fixture(scope="module")
def every_system(tmp_path_factory):
    """One tiny run of every system (``--tiny`` without ``--systems``), fp32; its JSON."""
    out = tmp_path_factory.mktemp("model") / "model.json"
    threads = torch.get_num_threads()
    try:
        assert model_bench.main([*TINY, "--precisions", "fp32", "--boxes", "1,3", *OPEN_WORLD, "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_model_benchmark_every_system(every_system):
    r = every_system
    assert set(r) >= {"ceilings", "rows", "machine", "settings", "errors"}
    assert r["errors"] == []
    assert set(r["ceilings"]) == {"fp32", "bf16"} and all(v > 0 for v in r["ceilings"].values())
    assert {"cpu", "date", "torch", "cpu_count"} <= set(r["machine"])
    rows = [row for row in r["rows"] if row["system"] in SYSTEMS]
    assert [(row["system"], row["boxes"]) for row in rows] == [(s, n) for s in SYSTEMS for n in (1, 3)]
    for row in rows:
        assert row["precision"] == "fp32" and row["batch"] == 1
        assert row["gflops"] == pytest.approx(row["gflops_image"] + row["gflops_boxes"])
        assert row["floor_s"] == pytest.approx(row["gflops"] / r["ceilings"]["fp32"])
        assert row["ratio"] == pytest.approx(row["p50_s"] / row["floor_s"])
        assert 0 < row["p50_s"] <= row["p90_s"] and len(row["samples_s"]) == 2
        assert row["params_m"] > 0 and row["stages"] and all(v >= 0 for v in row["stages"].values())
    by = {(row["system"], row["boxes"]): row for row in rows}
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


def test_model_benchmark_open_world_systems(every_system):
    r = every_system
    rows = [row for row in r["rows"] if row["system"] in open_world.SYSTEMS]
    assert [(row["system"], row["classes"]) for row in rows] == [(s, c) for s in open_world.SYSTEMS
                                                                 for c in (80, 1203)]
    for row in rows:
        assert row["precision"] == "fp32" and row["batch"] == 1 and row["params_m"] > 0
        assert row["gflops"] > 0 and 0 < row["p50_s"] <= row["p90_s"] and len(row["samples_s"]) == 2
        assert row["gflops"] == pytest.approx(row["gflops_image"] + row["gflops_boxes"])
        assert sum(row["stage_gflops"].values()) == pytest.approx(row["gflops"], rel=1e-6)  # stages cover the pass
        assert row["floor_s"] == pytest.approx(row["gflops"] / r["ceilings"]["fp32"])
        assert row["ratio"] == pytest.approx(row["p50_s"] / row["floor_s"])
        assert row["extrapolated"] == (row["measured_calls"] < row["calls"])
        assert (row["text_gflops"] is not None) == (row["system"] in ("owlv2+ovsam", "sam3"))
        assert row["text_gflops"] is None or (row["text_gflops"] > 0 and row["text_s"] > 0)
    by = {(row["system"], row["classes"]): row for row in rows}
    for s in ("owlv2+ovsam", "grounding-dino+ovsam", "sam3", "proposals:owlv2"):
        assert by[s, 80]["boxes"] == by[s, 1203]["boxes"] == 5  # the detector's (SAM 3's) best 5
    assert by["grid", 80]["boxes"] == 64 and by["grid", 80]["calls"] == 1
    assert {"detector", "encode_images", "decode+recognition", "masks+labels"} == set(by["owlv2+ovsam", 80]["stages"])
    assert {"vision", "detr+masks", "masks+labels"} == set(by["sam3", 80]["stages"])
    assert {"encode_images", "grid"} == set(by["grid", 80]["stages"])

    # Grounding DINO reads the vocabulary as captions of <= 256 tokens, a whole model call each: LVIS costs more
    gd80, gd1203 = by["grounding-dino+ovsam", 80], by["grounding-dino+ovsam", 1203]
    assert not gd80["extrapolated"] and gd1203["extrapolated"] and gd1203["calls"] > gd80["calls"] > 1
    assert gd1203["gflops"] > 1.5 * gd80["gflops"] and gd1203["p50_s"] > gd80["p50_s"]
    assert gd1203["stage_gflops"]["detector"] / gd1203["calls"] == pytest.approx(
        gd80["stage_gflops"]["detector"] / gd80["calls"], rel=0.5)
    # OWLv2 embeds its queries once per vocabulary: the per-image work hardly grows, the one-off text work does
    owl80, owl1203 = by["owlv2+ovsam", 80], by["owlv2+ovsam", 1203]
    assert owl1203["queries"] > owl80["queries"] >= 80
    assert owl1203["text_gflops"] > 3 * owl80["text_gflops"] and owl1203["gflops"] < 1.2 * owl80["gflops"]
    # SAM 3: the image once, then one forward per concept, measured once (the same 8 batches) and scaled
    s80, s1203 = by["sam3", 80], by["sam3", 1203]
    assert s80["extrapolated"] and s1203["extrapolated"] and s80["measured_calls"] == s1203["measured_calls"] == 8
    assert s80["stage_gflops"]["vision"] == s1203["stage_gflops"]["vision"]
    assert s1203["stage_gflops"]["detr+masks"] == pytest.approx(s80["stage_gflops"]["detr+masks"] * 1203 / 80)
    assert s1203["text_gflops"] == pytest.approx(s80["text_gflops"] * 1203 / 80)
    # objectness proposals do not read the vocabulary
    assert by["proposals:owlv2", 80]["stage_gflops"]["detector"] == by["proposals:owlv2", 1203]["stage_gflops"][
        "detector"]


def test_open_world_classes():
    coco, lvis, again = open_world.parse_classes("80,1203,coco")
    assert (coco.label, len(coco), lvis.label, len(lvis), again) == ("coco", 80, "lvis", 1203, coco)
    assert sum(len(s) for s in coco.synonyms) == 173
    for bad in ("klingon", "81", ""):
        with pytest.raises(ValueError, match="--classes"):
            open_world.parse_classes(bad)


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
    assert model_bench.main(["--tiny", "--systems", "sam3", "--max-calls", "0"]) == 1
    assert model_bench.main(["--tiny", "--systems", "grid", "--classes", "klingon"]) == 1
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
