"""`ovsam relabel` and `ovsam show` on the output of a real annotation run (local Ray, ovsam-tiny).

One module-scoped run annotates the good shards of the test corpus with --store-embeddings; relabel and show then
work on that output. Show's "untouched pixels" property is checked on an output committed by hand through the
job's sink, whose masks cover a known part of each image of the bad-input shard (EXIF rotation, 16-bit, palette,
path-traversal keys, non-ok statuses). About 40 s on 2 cores, most of it the annotation run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.annotate import AnnotateConfig, run_annotate
from jobs.cli import main as cli_main
from jobs.relabel import RelabelConfig, run_relabel
from pipeline.inputs.decode import decode_sample
from pipeline.inputs.sources import iter_samples
from pipeline.annotate.stages import ModelStageConfig
from tests.pipeline.corpus import write_corpus

GOOD = ("good-000000", "good-000001")
OTHER_NAMES = ["dog", "bicycle", "teapot", "violin", "umbrella"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    vocab = root / "classes.txt"
    vocab.write_text("red square\nblue circle\ngreen triangle\n")
    other = root / "other.txt"
    other.write_text("\n".join(OTHER_NAMES) + "\n")
    return root, vocab, other


def _annotate(root: Path, vocab: Path, out: Path, *, store_embeddings: bool, limit: int | None = None) -> None:
    stage = ModelStageConfig(model="ovsam-tiny", vocabulary=str(vocab), top_k=5, store_embeddings=store_embeddings)
    summary = run_annotate(AnnotateConfig(inputs=(f"{root}/good-*.tar",), output=str(out), stage=stage,
                                          batch_size=4, workers=1, cpus_per_worker=1, limit=limit))
    assert not summary.failed


@pytest.fixture(scope="module")
def annotated(ray_local, corpus, tmp_path_factory):
    root, vocab, _ = corpus
    out = tmp_path_factory.mktemp("annotated") / "out"
    _annotate(root, vocab, out, store_embeddings=True)
    return out


def _instances(out: Path, shard: str) -> list[dict]:
    rows = pq.read_table(out / "instances" / f"{shard}.parquet").to_pylist()
    return sorted(rows, key=lambda r: (r["image_key"], r["instance_index"]))


def _images(out: Path, shard: str) -> list[dict]:
    return sorted(pq.read_table(out / "images" / f"{shard}.parquet").to_pylist(), key=lambda r: r["image_key"])


# ----------------------------------------------------------------------------------------------------------------
# relabel


def test_relabel_with_same_vocabulary_reproduces_stored_labels(annotated, corpus, tmp_path):
    _, vocab, _ = corpus
    out = tmp_path / "same"
    summary = run_relabel(RelabelConfig(input=str(annotated), output=str(out), vocabulary=str(vocab)))
    assert not summary.failed and sorted(s["shard"] for s in summary.per_shard) == list(GOOD)
    assert summary.changed == 0
    total = 0
    for shard in GOOD:
        old, new = _instances(annotated, shard), _instances(out, shard)
        assert len(new) == len(old) > 0
        total += len(new)
        for a, b in zip(old, new):
            assert (b["label"], b["label_name"], b["topk_labels"]) == (a["label"], a["label_name"], a["topk_labels"])
            assert b["label_score"] == pytest.approx(a["label_score"], abs=1e-6)
            assert b["background_score"] == pytest.approx(a["background_score"], abs=1e-6)
            assert b["topk_scores"] == pytest.approx(a["topk_scores"], abs=1e-6)
            for col in ("image_key", "instance_index", "mask_rle", "box_xyxy", "area", "head_embedding",
                        "clip_embedding", "clip_valid", "prompt_box_xyxy"):
                assert b[col] == a[col], col
        assert _images(out, shard) == _images(annotated, shard)
        manifest = json.loads((out / "_manifest" / f"{shard}.json").read_text())
        source_manifest = json.loads((annotated / "_manifest" / f"{shard}.json").read_text())
        assert manifest["input_url"] == source_manifest["input_url"]
        assert manifest["samples_read"] == source_manifest["samples_read"]
    assert summary.instances == total
    run = json.loads((out / "run.json").read_text())
    source_run = json.loads((annotated / "run.json").read_text())
    assert run["source"]["output"] == str(annotated)
    assert run["source"]["config_hash"] == source_run["config_hash"]
    assert run["vocabulary"]["content_hash"] == source_run["vocabulary"]["content_hash"]
    assert run["config_hash"] != source_run["config_hash"]
    assert all(json.loads((out / "_manifest" / f"{s}.json").read_text())["config_hash"] == run["config_hash"]
               for s in GOOD)
    assert not list((out / "_tmp").iterdir())

    # a rerun with the same arguments processes nothing and leaves the committed files alone
    before = {s: (out / "_manifest" / f"{s}.json").read_text() for s in GOOD}
    again = run_relabel(RelabelConfig(input=str(annotated), output=str(out), vocabulary=str(vocab)))
    assert again.per_shard == [] and again.shards_skipped == len(GOOD) and not again.failed
    assert {s: (out / "_manifest" / f"{s}.json").read_text() for s in GOOD} == before


def test_relabel_with_new_vocabulary(annotated, corpus, tmp_path, capsys):
    import ovsam
    from pipeline.annotate.relabel import relabel_rows

    _, vocab, other = corpus
    out = tmp_path / "other"
    assert cli_main(["relabel", "--input", str(annotated), "--vocabulary", str(other), "--output", str(out)]) == 0
    model = ovsam.build_ovsam("ovsam-tiny")
    vocabulary = ovsam.Vocabulary.from_file(other, model, progress=False)
    for shard in GOOD:
        old, new = _instances(annotated, shard), _instances(out, shard)
        assert len(new) == len(old) > 0
        expected = relabel_rows(old, vocabulary, model.config.recognition, 5)
        for row, want in zip(new, expected):
            assert row["label_name"] in OTHER_NAMES and row["label_name"] == OTHER_NAMES[row["label"]]
            assert 0 <= row["label"] < 5 and all(0 <= t < 5 for t in row["topk_labels"])
            assert len(row["topk_labels"]) == 5 and row["topk_labels"][0] == row["label"]
            assert (row["label"], row["topk_labels"]) == (want["label"], want["topk_labels"])
            assert row["label_score"] == pytest.approx(want["label_score"], abs=1e-6)
            # the scores are softmax(fused)[:C]: with all 5 classes in the top 5, they and the background sum to 1
            assert sum(row["topk_scores"]) + row["background_score"] == pytest.approx(1.0, abs=1e-5)
            assert row["label_score"] == max(row["topk_scores"])
    run = json.loads((out / "run.json").read_text())
    assert run["vocabulary"]["names"] == OTHER_NAMES
    coco_path = tmp_path / "coco.json"
    assert cli_main(["export-coco", "--input", str(out), "-o", str(coco_path)]) == 0
    assert [c["name"] for c in json.loads(coco_path.read_text())["categories"]] == OTHER_NAMES

    # another vocabulary or top-k into the same output is refused; --overwrite replaces the run
    capsys.readouterr()
    assert cli_main(["relabel", "--input", str(annotated), "--vocabulary", str(vocab), "--output", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert _instances(out, GOOD[0])[0]["label_name"] in OTHER_NAMES
    assert cli_main(["relabel", "--input", str(annotated), "--vocabulary", str(vocab), "--output", str(out),
                     "--top-k", "2", "--overwrite"]) == 0
    rows = _instances(out, GOOD[0])
    assert all(len(r["topk_labels"]) == 2 for r in rows)
    assert [r["label_name"] for r in rows] == [r["label_name"] for r in _instances(annotated, GOOD[0])]

    # a relabelled output can itself be relabelled (it keeps the embeddings and the model record)
    again = tmp_path / "again"
    assert cli_main(["relabel", "--input", str(out), "--vocabulary", str(other), "--output", str(again)]) == 0
    assert [r["label"] for r in _instances(again, GOOD[0])] == [r["label"] for r in _instances(tmp_path / "other",
                                                                                               GOOD[0])]


def test_relabel_reads_only_committed_shards(annotated, corpus, tmp_path):
    _, vocab, _ = corpus
    partial = tmp_path / "partial"
    shutil.copytree(annotated, partial)
    (partial / "_manifest" / f"{GOOD[1]}.json").unlink()  # as if the run was killed before committing it
    out = tmp_path / "out"
    summary = run_relabel(RelabelConfig(input=str(partial), output=str(out), vocabulary=str(vocab)))
    assert [s["shard"] for s in summary.per_shard] == [GOOD[0]]
    assert sorted(p.name for p in (out / "_manifest").iterdir()) == [f"{GOOD[0]}.json"]
    assert not (out / "instances" / f"{GOOD[1]}.parquet").exists()


def test_relabel_without_embeddings_is_a_clear_error(ray_local, corpus, tmp_path, capsys):
    root, vocab, other = corpus
    plain = tmp_path / "plain"
    _annotate(root, vocab, plain, store_embeddings=False, limit=1)
    with pytest.raises(ValueError, match="--store-embeddings"):
        run_relabel(RelabelConfig(input=str(plain), output=str(tmp_path / "x"), vocabulary=str(other)))
    capsys.readouterr()
    assert cli_main(["relabel", "--input", str(plain), "--vocabulary", str(other), "--output",
                     str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert "no stored region embeddings" in err and "--store-embeddings" in err
    assert not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------------------------------------------
# show


def _decoded_images(tar: Path) -> dict[str, np.ndarray]:
    return {s.key: decode_sample(s).image for s in iter_samples(str(tar))}


def _mask(row: dict) -> np.ndarray:
    from ovsam.masks import decode_rle

    return decode_rle([row["mask_rle"]])[0]


def test_show_renders_job_output(annotated, corpus, tmp_path, capsys):
    from pipeline.export.overlay import overlay_filename

    root, _, _ = corpus
    out_dir = tmp_path / "png"
    # no --shards: the input shards come from run.json
    assert cli_main(["show", "--input", str(annotated), "-n", "3", "--output", str(out_dir)]) == 0
    pngs = sorted(out_dir.glob("*.png"))
    assert len(pngs) == 3
    originals = _decoded_images(root / "good-000000.tar")
    rows_by_key: dict[str, list[dict]] = {}
    for row in _instances(annotated, "good-000000"):
        rows_by_key.setdefault(row["image_key"], []).append(row)
    sizes = {r["image_key"]: (r["width"], r["height"]) for r in _images(annotated, "good-000000")}
    names = {overlay_filename("good-000000", k): k for k in originals}
    for png in pngs:
        key = names[png.name]
        drawn = np.asarray(Image.open(png).convert("RGB"))
        image = originals[key]
        assert drawn.shape == image.shape and (drawn.shape[1], drawn.shape[0]) == sizes[key]
        changed = (drawn != image).any(axis=-1)
        for row in rows_by_key[key]:
            mask = _mask(row)
            assert mask.any()
            assert changed[mask].mean() > 0.9  # a caption plate may hide a few mask pixels
        # this random-init model's mask boxes span the image, so no pixel is far from them here; the hand-made
        # output below checks that pixels away from masks, boxes and captions are untouched
    # -n larger than the corpus renders every ok image once; a copy of the shards elsewhere is found by name
    moved = tmp_path / "moved"
    moved.mkdir()
    for shard in GOOD:
        shutil.copy(root / f"{shard}.tar", moved / f"{shard}.tar")
    all_dir = tmp_path / "all"
    assert cli_main(["show", "--input", str(annotated), "--shards", f"{moved}/good-*.tar", "-n", "50",
                     "--output", str(all_dir)]) == 0
    ok = sum(r["status"] == "ok" for s in GOOD for r in _images(annotated, s))
    assert len(list(all_dir.glob("*.png"))) == ok == 7


@pytest.fixture
def handmade(corpus, tmp_path):
    """An output committed through the job's sink for the bad-input shard: one rectangle mask per ok image, in the
    lower middle of the image, and the shard's URL recorded somewhere it no longer is."""
    from pipeline.annotate.ledger import write_run_json
    from pipeline.annotate.sinks import commit_shard
    from pipeline.inputs.sources import ShardReadReport

    import fsspec

    from ovsam.masks import encode_rle

    root, _, _ = corpus
    out = tmp_path / "handmade"
    image_rows, instance_rows, masks = [], [], {}
    for sample in iter_samples(str(root / "bad-000000.tar"), shard="bad-000000"):
        d = decode_sample(sample, require_prompts=True)
        image_rows.append({"image_key": d.key, "shard": "bad-000000", "status": d.status, "error": d.error,
                           "width": d.width, "height": d.height, "num_instances": int(d.status == "ok"),
                           "num_prompts": 1, "num_prompts_dropped": 0, "source_format": d.source_format,
                           "source_name": d.source_name})
        if d.status != "ok":
            continue
        h, w = d.image.shape[:2]
        mask = np.zeros((h, w), dtype=bool)
        y0, y1, x0, x1 = h // 2, 3 * h // 4, w // 4, 3 * w // 4
        mask[y0:y1, x0:x1] = True
        masks[d.key] = (mask, (x0, y0, x1, y1))
        instance_rows.append({
            "image_key": d.key, "shard": "bad-000000", "instance_index": 0, "prompt_type": "box",
            "prompt_box_xyxy": [x0, y0, x1, y1], "prompt_points": None, "prompt_point_labels": None,
            "box_xyxy": [x0, y0, x1, y1], "mask_rle": encode_rle(mask[None])[0], "area": int(mask.sum()),
            "mask_quality": 1.0, "label": 0, "label_name": "thing", "label_score": 0.5, "background_score": 0.1,
            "topk_labels": [0],
            "topk_scores": [0.5], "detector_score": None, "detector_label": None, "head_embedding": None,
            "clip_embedding": None, "clip_valid": None})
    fs = fsspec.filesystem("file")
    report = ShardReadReport(samples_read=len(image_rows), truncated=False, error=None, expected=None)
    commit_shard(fs, str(out), "bad-000000", instance_rows, image_rows, input_url=str(tmp_path / "gone.tar"),
                 config_hash="handmade", read_report=report, attempt_id="a")
    write_run_json(fs, str(out), {"config_hash": "handmade", "config": {}})
    statuses = {r["image_key"]: r["status"] for r in image_rows}
    return out, masks, statuses


def test_show_draws_only_on_masks_boxes_and_captions(handmade, corpus, tmp_path, capsys):
    from pipeline.export.overlay import overlay_filename, write_overlays

    root, _, _ = corpus
    out, masks, statuses = handmade
    assert sum(s != "ok" for s in statuses.values()) >= 5 and "../../escape/s000023" in masks

    # the manifest's URL is gone and run.json records no inputs: without --shards this is a clear error
    capsys.readouterr()
    assert cli_main(["show", "--input", str(out), "--output", str(tmp_path / "x")]) == 1
    assert "--shards" in capsys.readouterr().err

    out_dir = tmp_path / "png"
    paths = write_overlays(str(out), out_dir, limit=100, shards=[f"{root}/bad-*.tar"])
    assert len(paths) == len(masks)  # every ok image, no other
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in paths)
    assert all(p.parent == out_dir and p.name.startswith("bad-000000__") for p in paths)
    originals = _decoded_images(root / "bad-000000.tar")
    assert originals["s000012"].shape == (40, 20, 3)  # EXIF orientation 6 applied: stored 40 wide, 20 high
    escaped = out_dir / overlay_filename("bad-000000", "../../escape/s000023")
    assert escaped in paths and "/" not in escaped.name and escaped.name.startswith("bad-000000__")
    checked = 0
    for key, (mask, (x0, y0, x1, y1)) in masks.items():
        image = originals[key]
        drawn = np.asarray(Image.open(out_dir / overlay_filename("bad-000000", key)).convert("RGB"))
        assert drawn.shape == image.shape, key
        changed = (drawn != image).any(axis=-1)
        # every mask pixel is lightened towards white (one already white stays so) or outlined
        assert changed[mask & (image < 250).any(axis=-1)].all(), key
        # away from the box and its caption: the rows below both, and the columns left of the box below the
        # caption (at these image sizes the caption plate is 14 px high, above the box or from the top edge)
        caption_end = 16
        far = np.zeros_like(mask)
        far[max(y1 + 1, caption_end):, :] = True
        far[max(y0, caption_end):, : max(x0 - 1, 0)] = True
        assert not changed[far].any(), key
        checked += bool(far.sum() >= 0.1 * far.size)
    assert checked >= len(masks) - 1  # all but the 16x16 image, where the caption reaches below its box
