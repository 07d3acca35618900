"""``ovsam annotate --prompts detector:owlv2`` / ``proposals:owlv2`` on a folder, end to end on local Ray: every
image committed once, the detector's rows, run.json, a rerun that commits nothing; and the usage errors that stop
a run before anything is written or Ray starts."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from jobs.annotate import main as annotate_main  # noqa: E402
from pipeline.annotate.detectors import tiny  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ovd")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate(((48, 64), (80, 40), (64, 64), (30, 90), (72, 56))):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / f"img{i}.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    vocab = root / "classes.txt"
    vocab.write_text("cat,kitty | base\ndog | novel\nbird | excluded\n")
    weights = {name: str(tiny.save_tiny_detector(name, root / name)) for name in ("owlv2", "owlvit")}
    return root, photos, vocab, weights


def _args(photos, vocab, out, prompts, weights, *extra):
    return ["--input", str(photos), "--output", str(out), "--vocabulary", str(vocab), "--prompts", prompts,
            "--detector-weights", weights, "--images-per-shard", "3", "--workers", "1", "--cpus-per-worker", "1",
            "--batch-size", "2", "--precision", "fp32", "-q", *extra]


def _committed(out):
    images = [r for f in sorted((out / "images").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    instances = [r for f in sorted((out / "instances").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    return images, instances


@pytest.mark.parametrize("prompts", ["detector:owlv2", "proposals:owlv2"])
def test_folder_is_annotated_once_and_a_rerun_commits_nothing(ray_local, setup, tmp_path, prompts):
    root, photos, vocab, weights = setup
    out = tmp_path / "out"
    args = _args(photos, vocab, out, prompts, weights["owlv2"], "--detector-score-thresh", "0.0",
                 "--max-detections", "4")
    assert annotate_main(args) == 0
    images, instances = _committed(out)
    keys = [r["image_key"] for r in images]
    assert sorted(keys) == sorted(p.name for p in photos.iterdir()) and len(keys) == len(set(keys))
    status = {r["image_key"]: r["status"] for r in images}
    assert status.pop("broken.jpg") == "decode_error" and set(status.values()) == {"ok"}
    assert instances and all(r["prompt_type"] == prompts for r in instances)
    per_image = {}
    for r in instances:
        per_image.setdefault(r["image_key"], []).append(r)
    assert all(len(v) <= 4 for v in per_image.values())
    for r in instances:
        assert r["prompt_box_xyxy"] is not None and isinstance(r["detector_score"], float)
        if prompts.startswith("detector"):
            assert r["detector_label"] in ("cat", "dog")  # bird is excluded: never queried
        else:
            assert r["detector_label"] is None
    run = json.loads((out / "run.json").read_text())
    hashed = run["hashed"]
    assert hashed["detector"] == prompts and len(hashed["detector_weights_sha256"]) == 64
    assert hashed["detector_score_thresh"] == 0.0 and hashed["detector_nms_thresh"] == 0.3
    assert (hashed.get("detector_template") == "a photo of a {}") == prompts.startswith("detector")
    manifests = {p.name: p.stat().st_mtime_ns for p in (out / "_manifest").glob("*.json")}
    assert len(manifests) == 2
    assert annotate_main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "_manifest").glob("*.json")} == manifests
    assert _committed(out) == (images, instances)
    # other thresholds, or another template for the queries, make another config: refused into the same output
    assert annotate_main(args + ["--detector-nms-thresh", "0.5"]) == 1
    assert annotate_main(args + ["--detector-template", "a {}"]) == (1 if prompts.startswith("detector") else 0)


def _run_cli(args, cwd):
    code = ("import sys, json; from jobs.cli import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(json.dumps({'rc': rc, 'ray': 'ray' in sys.modules and __import__('ray').is_initialized()}), "
            "file=sys.stderr)")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, "annotate", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc.stderr


def test_usage_errors_exit_2_before_anything_starts(setup, tmp_path):
    root, photos, vocab, weights = setup
    excluded = tmp_path / "excluded.txt"
    excluded.write_text("bird | excluded\ncat | excluded\n")
    cases = [
        (["--prompts", "detector:owlv2", "--detector-weights", str(tmp_path / "missing")], "no such"),
        (["--prompts", "detector:owlv2", "--detector-weights", weights["owlvit"]], "'owlvit' model, not 'owlv2'"),
        (["--prompts", "detector:owlv3", "--detector-weights", weights["owlv2"]], "unknown detector 'owlv3'"),
        (["--prompts", "proposals:retinanet_resnet50_fpn", "--detector-weights", str(vocab)], "two-stage"),
        (["--prompts", "proposals:owlvit", "--detector-weights", weights["owlvit"]], "objectness"),
        (["--prompts", "detector:owlv2", "--detector-weights", weights["owlv2"], "--vocabulary", str(excluded)],
         "no usable names"),
        (["--prompts", "detector:owlv2", "--detector-weights", weights["owlv2"], "--detector-template", "a photo"],
         "exactly one"),
        (["--prompts", "detector:owlv2"], "needs --detector-weights"),
    ]
    for extra, message in cases:
        out = tmp_path / "never"
        args = ["--input", str(photos), "--output", str(out), "--vocabulary", str(vocab), *extra]
        result, stderr = _run_cli(args, ROOT)
        assert result == {"rc": 2, "ray": False}, (extra, stderr[-1500:])
        assert message in stderr, (extra, stderr[-1500:])
        assert not out.exists()
