"""Invalid invocations: each exits 2 (1 for a failure found at run time) with a message naming the option, writes
nothing, and leaves the output usable for the corrected command."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = int(e.code)
    return rc, capsys.readouterr().err


@pytest.fixture()
def shard(tmp_path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(buf, format="JPEG")
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("000000.jpg", buf.getvalue()),
                           ("000000.json", json.dumps({"boxes": [[4, 4, 40, 30]]}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# (extra annotate arguments or a whole argv, expected exit code, text the message must contain)
ANNOTATE_CASES = [
    (["--prompts", "boxes"], 2, "--prompts"),
    (["--prompts", "detector"], 2, "--prompts"),
    (["--prompts", "detector:no_such_detector", "--detector-weights", "{missing}"], 2, "--prompts"),
    (["--prompts", "detector:fasterrcnn_resnet50_fpn"], 2, "--detector-weights"),
    (["--prompts", "detector:fasterrcnn_resnet50_fpn", "--detector-weights", "{missing}"], 2, "--detector-weights"),
    (["--detector-weights", "{missing}"], 2, "--detector-weights"),
    (["--model", "no-such-model"], 2, "--model"),
    (["--model", "sam-vit-b"], 2, "--model"),
    (["--checkpoint", "{missing}"], 2, "--checkpoint"),
    (["--top-k", "0"], 2, "--top-k"),
    (["--workers", "0"], 2, "--workers"),
    (["--batch-size", "0"], 2, "--batch-size"),
    (["--batch-size", "eight"], 2, "--batch-size"),
    (["--max-pixels", "0"], 2, "--max-pixels"),
    (["--points-per-side", "0"], 2, "--points-per-side"),
    (["--detector-score-thresh", "1.5"], 2, "--detector-score-thresh"),
    (["--prompts", "grid", "--stability-score-thresh", "2"], 2, "--stability-score-thresh"),
    (["--prompts", "grid", "--box-nms-thresh", "-0.1"], 2, "--box-nms-thresh"),
    (["--prompts", "grid", "--min-mask-area", "-1"], 2, "--min-mask-area"),
    (["--cpus-per-worker", "0"], 2, "--cpus-per-worker"),
    (["--precision", "fp64"], 2, "--precision"),
    (["--storage-options", "{bad"], 2, "--storage-options"),
    (["--storage-options", "[1]"], 2, "--storage-options"),
    (["--output", "{file}"], 2, "--output"),
    (["--input", "{missing}"], 1, "--input"),
    (["--images-per-shard", "0"], 2, "--images-per-shard"),
    (["--input", "{list}"], 1, "--url-column"),
    (["--vocabulary", "{missing_vocab}"], 2, "--vocabulary"),
]


@pytest.mark.parametrize(("extra", "code", "names"), ANNOTATE_CASES, ids=[" ".join(c[0]) for c in ANNOTATE_CASES])
def test_invalid_annotate_writes_nothing_and_the_corrected_run_proceeds(tmp_path, shard, capsys, extra, code,
                                                                         names):
    out = tmp_path / "out"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    url_list = tmp_path / "images.csv"
    url_list.write_text("path\nphoto.jpg\n")
    fill = {"{missing}": str(tmp_path / "missing.pt"), "{file}": str(a_file), "{list}": str(url_list),
            "{missing_vocab}": str(tmp_path / "classes.txt")}
    extra = [fill.get(x, x) for x in extra]
    base = {"--input": str(shard), "--output": str(out), "--vocabulary": "coco"}
    for flag in ("--input", "--output", "--vocabulary"):
        if flag in extra:
            base.pop(flag)
    argv = ["annotate", *[x for kv in base.items() for x in kv], *extra]
    rc, err = _run(argv, capsys)
    assert rc == code, err
    assert names in err and "Traceback" not in err, err
    assert not out.exists(), "a usage error must write nothing"
    assert a_file.read_text() == "not a directory"
    # the corrected command is not refused (a dry run reads the output's run.json, if any)
    rc, err = _run(["annotate", "--input", str(shard), "--output", str(out), "--vocabulary", "coco", "--dry-run"],
                   capsys)
    assert rc == 0, err


@pytest.mark.parametrize(("argv", "names"), [
    (["show", "--input", "x", "-n", "0"], "-n"),
    (["show", "--input", "x", "--storage-options", "{bad"], "--storage-options"),
    (["export-coco", "--input", "x", "-o", "y.json", "--storage-options", "[1]"], "--storage-options"),
    (["relabel", "--input", "x", "--output", "y", "--vocabulary", "coco", "--storage-options", "1"],
     "--storage-options"),
    (["pack", "synthetic", "--kind", "box", "--num-train", "1", "--num-heldout", "1", "--output", "y",
      "--storage-options", "{bad"], "--storage-options"),
    (["annotate", "--input", "x", "--output", "y", "--no-such-flag"], "--no-such-flag"),
    (["serve", "--token-env", "OVSAM_TEST_UNSET_TOKEN"], "--token-env OVSAM_TEST_UNSET_TOKEN"),
    (["serve", "--label-studio-key-env", "OVSAM_TEST_UNSET_KEY"], "--label-studio-key-env"),
    (["serve", "--model", "no-such-model"], "no-such-model"),
    (["serve", "--replicas", "0"], "--replicas"),
    (["serve", "--cache-ttl", "0"], "--cache-ttl"),
    (["serve", "--precision", "int8"], "--precision"),
    (["serve", "--allow-url-prefix", " "], "--allow-url-prefix"),
])
def test_other_invalid_values_exit_2(tmp_path, capsys, monkeypatch, argv, names):
    monkeypatch.chdir(tmp_path)
    rc, err = _run(argv, capsys)
    assert rc == 2 and names in err, err
    assert list(tmp_path.iterdir()) == []


def test_verbose_after_the_subcommand(capsys):
    assert main(["models", "-v"]) == 0
    assert "ovsam-tiny" in capsys.readouterr().out


def test_a_closed_pipe_is_not_an_error(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(f"{sys.executable} -m jobs.cli models | head -1", shell=True, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.count("\n") == 1 and "BrokenPipe" not in out.stderr and "Traceback" not in out.stderr


def test_grid_settings_reach_the_generator_and_the_config_hash(tmp_path):
    import argparse

    from jobs.annotate import add_arguments, config_from_args, hashed_config
    from pipeline.annotate.stages import Annotator

    def cfg(*extra):
        p = argparse.ArgumentParser()
        add_arguments(p)
        return config_from_args(p.parse_args(["--input", "x.tar", "--output", str(tmp_path / "o"), *extra]))

    grid = cfg("--prompts", "grid", "--points-per-side", "4", "--stability-score-thresh", "0.5",
               "--box-nms-thresh", "0.6", "--min-mask-area", "12", "--pred-iou-thresh", "0.7")
    st = grid.stage
    assert (st.points_per_side, st.stability_score_thresh, st.box_nms_thresh, st.min_mask_area,
            st.pred_iou_thresh) == (4, 0.5, 0.6, 12, 0.7)
    gen = Annotator(st).generator
    assert (gen.points_per_side, gen.stability_score_thresh, gen.box_nms_thresh, gen.min_mask_area,
            gen.pred_iou_thresh) == (4, 0.5, 0.6, 12, 0.7)
    h = hashed_config(grid, None, "v")
    assert h["stability_score_thresh"] == 0.5 and h["min_mask_area"] == 12
    assert hashed_config(cfg("--prompts", "grid", "--points-per-side", "4"), None, "v") != h
    # the grid's filters do not enter other runs' hashes: those resume as before
    side = hashed_config(cfg("--stability-score-thresh", "0.5"), None, "v")
    assert side == hashed_config(cfg(), None, "v") and "stability_score_thresh" not in side
