"""jobs.cli: the ovsam command's parsing, exit codes and wiring (no network, no real weights)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main
from ovsam.weights import RELEASED_FILES

ROOT = Path(__file__).resolve().parents[2]


def test_weights_lists_every_released_file(capsys):
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    for entry in RELEASED_FILES:
        assert entry.name in out and entry.url in out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["annotate-everything"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "weights" in err


def test_missing_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("weights", "convert-official", "models", "demo"):
        assert command in out


def test_help_runs_as_a_program():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ovsam")


def test_download_of_unknown_name_fails_with_the_choices(tmp_path, capsys):
    assert main(["weights", "download", "sam_vit_x.pth", "--dest", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "sam_vit_x.pth" in err and "sam_vit_h_4b8939.pth" in err
    assert list(tmp_path.iterdir()) == []


def test_download_passes_options_through(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_download(entry, dest, base_url=None, progress=True, force=False):
        calls.append((entry.name, dest, base_url, progress, force))
        return Path(dest) / entry.name

    monkeypatch.setattr("ovsam.weights.download", fake_download)
    code = main(["weights", "download", "sam2clip_vith_rn50x16.pth", "clip2sam_lvis_rn50x16.pth",
                 "--dest", str(tmp_path), "--base-url", "http://127.0.0.1:9/m", "--quiet"])
    assert code == 0
    assert calls == [
        ("sam2clip_vith_rn50x16.pth", tmp_path, "http://127.0.0.1:9/m", False, False),
        ("clip2sam_lvis_rn50x16.pth", tmp_path, "http://127.0.0.1:9/m", False, False),
    ]
    assert str(tmp_path / "clip2sam_lvis_rn50x16.pth") in capsys.readouterr().out


def test_convert_official_calls_the_converter(tmp_path, monkeypatch, capsys):
    files = {}
    for flag in ("sam", "sam2clip", "clip2sam"):
        files[flag] = tmp_path / f"{flag}.pth"
        files[flag].write_bytes(b"x")
    seen = {}
    monkeypatch.setattr("ovsam.convert.convert_official", lambda **kw: seen.update(kw), raising=False)
    out = tmp_path / "ovsam_coco.safetensors"
    code = main(["convert-official", "--clip", "openai", "--sam", str(files["sam"]), "--sam2clip",
                 str(files["sam2clip"]), "--clip2sam", str(files["clip2sam"]), "-o", str(out),
                 "--vocabulary", "coco", "--roi-size", "7"])
    assert code == 0
    assert seen == {"clip": "openai", "sam": files["sam"], "sam2clip": files["sam2clip"],
                    "clip2sam": files["clip2sam"], "output": out, "vocabulary": "coco", "roi_size": 7}
    assert str(out) in capsys.readouterr().out


def test_convert_official_reports_a_missing_input(tmp_path, capsys):
    code = main(["convert-official", "--clip", "openai", "--sam", str(tmp_path / "sam_vit_h_4b8939.pth"),
                 "--sam2clip", str(tmp_path / "a.pth"), "--clip2sam", str(tmp_path / "b.pth"),
                 "-o", str(tmp_path / "out.safetensors")])
    assert code == 1
    err = capsys.readouterr().err
    assert "--sam" in err and "ovsam weights download sam_vit_h_4b8939.pth" in err


def test_convert_official_requires_its_inputs(capsys):
    with pytest.raises(SystemExit) as info:
        main(["convert-official", "--clip", "openai"])
    assert info.value.code == 2
    assert "--sam" in capsys.readouterr().err


def test_models_lists_the_builtin_configs(capsys):
    import ovsam

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ovsam.list_models()
    assert {"ovsam-rn50x16", "ovsam-tiny", "sam-vit-h"} <= set(ovsam.list_models())


def test_annotate_precision_flags(capsys):
    """--precision takes the model's choices and --compile a switch; both reach the model stage's config, and a
    bad precision is a usage error before anything runs."""
    import argparse

    from jobs.annotate import PRECISION_CHOICES, add_arguments, config_from_args
    from ovsam.precision import PRECISIONS

    assert PRECISION_CHOICES == PRECISIONS
    p = argparse.ArgumentParser()
    add_arguments(p)
    stage = config_from_args(p.parse_args(["--input", "x", "--output", "y"])).stage
    assert (stage.precision, stage.compile) == ("auto", False)
    stage = config_from_args(p.parse_args(["--input", "x", "--output", "y", "--precision", "bf16", "--compile"])).stage
    assert (stage.precision, stage.compile) == ("bf16", True)
    with pytest.raises(SystemExit) as info:
        main(["annotate", "--input", "x", "--output", "y", "--precision", "int8"])
    assert info.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


def test_annotate_parser_imports_neither_torch_nor_ray():
    code = ("import argparse, sys; from jobs.annotate import add_arguments; p = argparse.ArgumentParser(); "
            "add_arguments(p); p.parse_args(['--input', 'x', '--output', 'y', '--precision', 'fp16']); "
            "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


_IMPORT_PROBE = r"""
import json, sys
from jobs.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("torch", "ray", "torchvision", "open_clip", "segment_anything", "transformers")
               if m in sys.modules)
print(json.dumps({"rc": rc, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["models"], ["weights"], ["annotate", "--help"], ["train", "--help"], ["distill", "--help"],
    ["pack", "--help"], ["relabel", "--help"], ["show", "--help"], ["export-coco", "--help"], ["demo", "--help"],
    ["convert-official", "--help"], ["weights", "download", "--help"], ["predict", "--help"],
])
def test_help_and_listings_import_neither_torch_nor_ray(argv: list[str]) -> None:
    import json

    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *argv], capture_output=True, text=True, timeout=120)
    result = json.loads(out.stderr.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": []}, (argv, out.stderr[-2000:])
