"""The pipeline benchmark end to end at a tiny size: both measurements ran the same work and gave rates and a ratio.

Run time: about 30 s on 2 cores (a local Ray instance, one actor, two model builds).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.corpus import parse_sizes
from bench.pipeline import main

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_reports_rates_and_ratio(tmp_path):
    out = tmp_path / "result.json"
    vocabulary = tmp_path / "classes.txt"  # a two-class vocabulary embeds faster than coco's 80 in every build
    vocabulary.write_text("rectangle\nellipse\n")
    assert main(["--shards", "1", "--images-per-shard", "4", "--image-size", "160x120,96x128", "--batch-size", "2",
                 "--workers", "1", "--cpus-per-worker", "1", "--ray-cpus", "2", "--vocabulary", str(vocabulary),
                 "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    mo, job = r["model_only"], r["job"]
    boxes = r["corpus"]["boxes"]
    assert r["corpus"]["images"] == 4 and 12 <= boxes <= 40  # 3-10 sidecar boxes per image
    # both sides annotated every image and answered every sidecar box (the model-only loop ran twice)
    assert mo["images"] == 8 and mo["prompts"] == 2 * boxes and mo["statuses"] == {"ok": 4}
    assert job["images"] == 4 and job["prompts"] == boxes and job["statuses"] == {"ok": 4}
    assert job["instances"] == boxes and mo["instances"] == 2 * boxes
    for rate in (mo["images_per_s"], mo["boxes_per_s"], mo["images_per_s_before"], mo["images_per_s_after"],
                 job["images_per_s_wall"], job["images_per_s_run"], job["images_per_s_steady"],
                 job["boxes_per_s_steady"], r["decode"]["images_per_s"]):
        assert rate > 0
    # start-up is excluded from the steady rate only, so the rates are ordered
    assert job["images_per_s_steady"] >= job["images_per_s_run"] >= job["images_per_s_wall"]
    assert r["ratio"] > 0 and r["ratio"] == pytest.approx(job["images_per_s_steady"] / mo["images_per_s"])
    assert set(job["stage_ms_per_image"]) == {"wait_input", "model", "wait_rows", "write", "other"}
    assert job["stage_ms_per_image"]["model"] > 0
    # Ray gives a 1-CPU task one torch thread, the count the model-only loop used
    assert r["actor_torch_threads"]["torch_threads"] == mo["torch_threads"] == 1
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # cleaned up


def test_script_runs_from_a_file_path():
    """`python bench/pipeline.py` must import the project's `pipeline` package, not itself."""
    proc = subprocess.run([sys.executable, "bench/pipeline.py", "--image-size", "640by480"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "--image-size expects WIDTHxHEIGHT" in proc.stderr


def test_parse_sizes():
    assert parse_sizes("640x480, 1024X768") == ((640, 480), (1024, 768))
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_sizes("640x")
