"""bench/gpu: the summary table from a run folder (whatever steps succeeded), the wheel-tag check of the installer,
and (slow) the whole run.sh as a tiny CPU smoke run.

Run time: about 1 s without the slow test; the slow one about 2-4 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu import env as gpu_env
from bench.gpu import summarize

REPO = Path(__file__).resolve().parents[2]

ROW = {"system": "ovsam-rn50x16", "precision": "bf16", "compile": False, "batch": 16, "boxes": 10,
       "gflops_per_image": 2270.0, "p50_s": 0.32, "p90_s": 0.35, "images_per_s": 50.0, "ratio": 6.5}


def test_summary_of_a_run_folder(tmp_path):
    (tmp_path / "steps.tsv").write_text("env\tok\t0\t5\nmodel_eager\tok\t0\t90\nmodel_stage\tfailed\t1\t12\n"
                                        "model_compile\ttimeout\t124\t240\n")
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "cpu_count": 16,
                                                   "python": "3.11.9", "torch": "2.9.0", "cuda": "12.8"}))
    (tmp_path / "model_eager.json").write_text(json.dumps({"ceilings": {"fp32": 5.0e4, "bf16": 7.0e5},
                                                           "rows": [ROW], "errors": [], "partial": False}))
    # the compile step ran out of time after its first system: a partial JSON with its error
    (tmp_path / "model_compile.json").write_text(json.dumps({
        "ceilings": {"bf16": 7.1e5}, "rows": [{**ROW, "compile": True, "p50_s": 0.2, "images_per_s": 80.0}],
        "errors": [{"system": "ovsam-rn50x16", "precision": "bf16", "batch": 1, "error": "RuntimeError: boom"}],
        "partial": True}))
    text, data = summarize.summarize(tmp_path)
    assert [s["status"] for s in data["steps"]] == ["ok", "ok", "failed", "timeout"]
    assert "NVIDIA H200" in text and "model stage: no result" in text
    assert len(data["rows"]) == 2 and "model_compile.json: partial" in text
    assert "FAILED ovsam-rn50x16 bf16 batch 1: RuntimeError: boom" in text
    table_rows = [line for line in text.splitlines() if line.startswith("ovsam-rn50x16")]
    assert len(table_rows) == 2 and "yes" in table_rows[1] and "20.0" in table_rows[0]  # 320 ms / 16 images


def test_summary_of_an_empty_folder(tmp_path):
    text, data = summarize.summarize(tmp_path)
    assert data["rows"] == [] and "no model rows" in text


def test_wheel_tags(monkeypatch):
    here = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    monkeypatch.setattr(gpu_env.sysconfig, "get_platform", lambda: "linux-x86_64")
    assert gpu_env._wheel_fits("ftfy-6.3.1-py3-none-any.whl")
    assert gpu_env._wheel_fits(f"regex-1-{here}-{here}-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    assert not gpu_env._wheel_fits("regex-1-cp27-cp27mu-manylinux2014_x86_64.whl")
    assert gpu_env._wheel_fits("pycocotools-2.0.11-cp39-abi3-manylinux2014_x86_64.whl")
    assert not gpu_env._wheel_fits("pycocotools-2.0.11-cp399-abi3-manylinux2014_x86_64.whl")


def test_run_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "bench/gpu/run.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(REPO / "bench/gpu/build_wheels.sh")]).returncode == 0


@pytest.mark.slow
def test_run_script_tiny_on_cpu(tmp_path):
    env = {**os.environ, "BENCH_DEVICE": "cpu", "BENCH_TINY": "1", "BENCH_SKIP_COMPILE": "1",
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu/run.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    steps = (tmp_path / "steps.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in steps] == [["env", "ok"], ["model_eager", "ok"], ["model_stage", "ok"],
                                                        ["open_world", "ok"], ["model_compile", "skipped"]]
    summary = json.loads((tmp_path / "summary.json").read_text())
    # fp32/bf16 x batch 1/2 x 1/10 boxes, then 5 open-world systems x 80/1,203 classes
    assert len(summary["rows"]) == 8 + 10
    assert {row["system"] for row in summary["rows"] if row["source"] == "model_open_world.json"} == {
        "owlv2+ovsam", "grounding-dino+ovsam", "sam3", "grid", "proposals:owlv2"}
    assert "once per vocabulary: sam3 bf16 1203 classes" in proc.stdout
    assert summary["model_stage"]["images_per_s"] > 0
    assert "model stage (ovsam-tiny bf16" in proc.stdout


def test_unpack_without_pip(tmp_path, monkeypatch):
    """Where pip is missing, the fitting wheel is unpacked into bench/gpu/site (here a temporary folder)."""
    import zipfile

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fake_pkg-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fake_pkg/__init__.py", "VALUE = 7\n")
    monkeypatch.setattr(gpu_env, "SITE", tmp_path / "site")
    assert gpu_env.unpack("fake-pkg", wheels)
    assert (tmp_path / "site" / "fake_pkg" / "__init__.py").read_text() == "VALUE = 7\n"
    assert not gpu_env.unpack("other", wheels)
