"""Invalid invocations: each exits 2 (1 for a failure found at run time) with a message naming the option, writes
nothing, starts no Ray, and leaves the output usable for the corrected command. Inputs that do not expand (a glob that
matches nothing, a bad brace range, a shard or list file that does not exist) are usage errors too."""

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
def no_ray(monkeypatch) -> None:
    """Starting Ray, or handing shards to its workers, fails the test."""
    import ray

    import pipeline.annotate.run as run

    def refuse(*args, **kwargs):
        raise AssertionError("a usage error must be found before Ray starts")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(run, "run_shards", refuse)


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
    (["--input", "{missing}"], 2, "--input"),
    (["--input", "{nomatch}"], 2, "--input"),
    (["--input", "{badbrace}"], 2, "--input"),
    (["--input", "{missing_list}"], 2, "--input"),
    (["--input", "{missing_csv}"], 2, "--input"),
    (["--images-per-shard", "0"], 2, "--images-per-shard"),
    (["--input", "{list}"], 2, "--url-column"),
    (["--vocabulary", "{missing_vocab}"], 2, "--vocabulary"),
]


@pytest.mark.parametrize(("extra", "code", "names"), ANNOTATE_CASES, ids=[" ".join(c[0]) for c in ANNOTATE_CASES])
def test_invalid_annotate_writes_nothing_and_the_corrected_run_proceeds(tmp_path, shard, capsys, no_ray, extra,
                                                                         code, names):
    out = tmp_path / "out"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    url_list = tmp_path / "images.csv"
    url_list.write_text("path\nphoto.jpg\n")
    fill = {"{missing}": str(tmp_path / "missing.pt"), "{file}": str(a_file), "{list}": str(url_list),
            "{missing_vocab}": str(tmp_path / "classes.txt"), "{nomatch}": str(tmp_path / "nothing-*.tar"),
            "{badbrace}": str(tmp_path / "shard-{000000..}.tar"), "{missing_list}": str(tmp_path / "shards.txt"),
            "{missing_csv}": str(tmp_path / "urls.csv")}
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
    (["relabel", "--input", "x", "--output", "y", "--vocabulary", "coco", "--top-k", "0"], "--top-k"),
    (["relabel", "--input", "x", "--output", "y", "--vocabulary", "coco", "--top-k", "-3"], "--top-k"),
    (["relabel", "--input", "x", "--output", "y", "--vocabulary", "coco", "--threads", "0"], "--threads"),
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


def test_relabel_range_errors_exit_2_by_every_entry_point(tmp_path, capsys, monkeypatch):
    """``python -m jobs.relabel`` exits 2 like ``ovsam relabel``; a namespace built without the parser (a
    programmatic caller) gets the same check from ``config_from_args``, as a usage error."""
    import argparse

    from jobs import relabel
    from jobs.args import UsageError

    monkeypatch.chdir(tmp_path)
    for top_k in ("0", "-1"):
        rc, err = _run_main(relabel.main, ["--input", "x", "--output", "y", "--vocabulary", "coco", "--top-k",
                                           top_k], capsys)
        assert rc == 2 and "--top-k" in err and "Traceback" not in err, err
    args = argparse.Namespace(input="x", output="y", vocabulary="coco", top_k=0, checkpoint=None, threads=2,
                              overwrite=False, storage_options={})
    with pytest.raises(UsageError, match="--top-k must be >= 1, got 0"):
        relabel.config_from_args(args)
    assert relabel.config_from_args(argparse.Namespace(**{**vars(args), "top_k": 1})).top_k == 1
    assert list(tmp_path.iterdir()) == []


def _run_main(main_fn, argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main_fn(argv)
    except SystemExit as e:
        rc = int(e.code)
    return rc, capsys.readouterr().err


def test_annotate_input_glob_matching_nothing_is_a_usage_error(tmp_path, capsys, no_ray):
    """The job's own entry point (``python -m jobs.annotate``) and ``ovsam annotate`` exit 2 with argparse's kind of
    message, write nothing and start no Ray."""
    from jobs import annotate

    out = tmp_path / "out"
    spec = str(tmp_path / "nothing-*.tar")
    for entry, argv, prog in ((main, ["annotate"], "ovsam annotate"), (annotate.main, [], "ovsam annotate")):
        rc, err = _run_main(entry, [*argv, "--input", spec, "--output", str(out)], capsys)
        assert rc == 2, err
        assert err.startswith(f"{prog}: error: ") and "nothing-*.tar" in err and "matched no" in err, err
        assert not out.exists()


@pytest.fixture()
def annotated_output(tmp_path: Path) -> Path:
    """An output root with a run.json (all that the checks of --shards read)."""
    import fsspec

    from pipeline.annotate.ledger import write_run_json

    out = tmp_path / "ann"
    write_run_json(fsspec.filesystem("file"), str(out), {"config_hash": "h", "config": {"inputs": ["x.tar"]}})
    return out


@pytest.mark.parametrize("spec", ["nothing-*.tar", "shard-{000..}.tar", "shards.txt"])
@pytest.mark.parametrize("command", ["show", "export", "eval coco", "eval compare", "eval prompts"])
def test_shards_that_do_not_expand_exit_2(tmp_path, annotated_output, capsys, monkeypatch, no_ray, command, spec):
    """``--shards`` of the commands that read annotated images again (show, export, eval coco/compare's report)
    and of eval prompts' packed set: a spec that does not expand is a usage error, before anything is written."""
    monkeypatch.chdir(tmp_path)
    out = str(annotated_output)
    shards = ["--shards", str(tmp_path / spec)]
    argv = {"show": ["show", "--input", out, "--output", "overlays", *shards],
            "export": ["export", "--input", out, "-o", "coco.json", "--images-dir", "images", *shards],
            "eval coco": ["eval", "coco", "--gt", "gt.json", "--pred", out, "--report", "rep", *shards],
            "eval compare": ["eval", "compare", out, out, "--report", "rep", *shards],
            "eval prompts": ["eval", "prompts", "--output", "ev", *shards]}[command]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc, err = _run(argv, capsys)
    assert rc == 2 and "--shards" in err and "Traceback" not in err, err
    assert err.startswith(f"ovsam {command.split()[0]}: error: "), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "a usage error writes nothing"


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


@pytest.mark.parametrize("mode", ["online", "heldout", "dump"])
def test_distill_inputs_that_do_not_expand_exit_2(tmp_path, capsys, monkeypatch, no_ray, mode):
    """``ovsam distill --input/--heldout`` and ``--dump-teacher --input``: a spec that does not expand is a usage
    error named by its flag, by both entry points, before Ray starts or anything is written."""
    from jobs import distill
    from pipeline.training.packers.synthetic import pack_synthetic

    monkeypatch.chdir(tmp_path)
    nothing = str(tmp_path / "nothing-*.tar")
    if mode == "heldout":
        pack_synthetic(str(tmp_path / "data"), kind="mask", num_train=2, num_heldout=1, samples_per_shard=1)
        train = str(tmp_path / "data" / "train" / "*.tar")
    common = ["--student", "ovsam-tiny", "--teacher", "sam-tiny"]
    argv = {"online": [*common, "--input", nothing, "--name", "r", "--storage-path", "runs"],
            "heldout": [*common, "--input", train if mode == "heldout" else "", "--heldout", nothing, "--name", "r",
                        "--storage-path", "runs"],
            "dump": ["--dump-teacher", "--teacher", "sam-tiny", "--input", nothing, "--output", "cache"]}[mode]
    flag = "--heldout" if mode == "heldout" else "--input"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for entry, prefix in ((main, ["distill"]), (distill.main, [])):
        rc, err = _run_main(entry, [*prefix, *argv], capsys)
        assert rc == 2 and flag in err and "nothing-*.tar" in err and "Traceback" not in err, err
        assert err.startswith("ovsam distill: error: "), err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "a usage error writes nothing"
