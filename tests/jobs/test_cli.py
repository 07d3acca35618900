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
    monkeypatch.setattr("ovsam.checkpoint.convert_official", lambda **kw: seen.update(kw), raising=False)
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


def test_demo_scene_boxes_enclose_the_drawn_shapes():
    import numpy as np

    from jobs.demo import SHAPE_NAMES, make_scene

    image, boxes, names = make_scene(seed=0)
    assert image.dtype == np.uint8 and image.shape == (384, 512, 3)
    assert names == list(SHAPE_NAMES) and boxes.shape == (3, 4)
    targets = {"red square": (220, 40, 40), "blue circle": (40, 80, 225), "green triangle": (40, 190, 70)}
    for (x0, y0, x1, y1), name in zip(boxes, names, strict=True):
        hit = np.all(image == np.array(targets[name], dtype=np.uint8), axis=-1)
        ys, xs = np.nonzero(hit)
        assert hit.sum() > 2000
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1


def test_demo_rle_round_trips_and_overlay_marks_the_masks():
    import numpy as np
    from pycocotools import mask as mask_utils

    from jobs.demo import render_overlay
    from ovsam.masks import encode_rle

    rng = np.random.default_rng(0)
    masks = rng.random((2, 80, 100)) > 0.5
    rles = encode_rle(masks)
    assert all(isinstance(r["counts"], str) and r["size"] == [80, 100] for r in rles)
    decoded = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks)

    image = np.full((80, 100, 3), 100, dtype=np.uint8)
    overlay = np.asarray(render_overlay(image, np.array([[10, 40, 30, 50]]), masks[:1], ["thing 0.50"]))
    assert overlay.shape == image.shape
    below = np.zeros((80, 100), dtype=bool)
    below[55:] = True  # under the prompt box and its caption
    assert (overlay[below & masks[0]] != 100).any(axis=-1).all()
    assert (overlay[below & ~masks[0]] == 100).all()


def test_demo_writes_overlay_and_predictions(tmp_path, capsys):
    import json

    import ovsam

    if not hasattr(ovsam, "Vocabulary"):
        pytest.skip("ovsam.Vocabulary is not part of the model library yet")
    from pycocotools import mask as mask_utils

    assert main(["demo", "--output", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "predictions.json").read_text())
    assert record["vocabulary"] == ["red square", "blue circle", "green triangle"]
    assert len(record["instances"]) == 3
    for inst in record["instances"]:
        assert inst["label_name"] == record["vocabulary"][inst["label"]]
        assert inst["label_score"] == max(inst["label_scores"])
        rle = inst["mask_rle"]
        assert rle["size"] == [384, 512]
        assert int(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).sum()) == inst["area"]
    assert (tmp_path / "overlay.png").stat().st_size > 0
    assert "ovsam demo" in capsys.readouterr().out
