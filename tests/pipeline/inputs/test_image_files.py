"""Image files as input: directories, globs, single images and Parquet/CSV/JSONL lists become deterministic
virtual shards with one images row per file, committed exactly once through driver kills like tar shards.

The job test's corpus is a folder of 60 files (nested directories; JPEG, PNG and WebP of mixed sizes; one corrupt
JPEG, one text file, one zero-byte PNG, one hidden file) plus a Parquet list of 40 more images given by relative
path. Its reference is an uninterrupted run; three SIGKILLs of the driver (helpers from ``test_exactly_once``) and a
rerun must commit byte-identical files. About 90 s on 2 cores, most of it the four job processes' Ray start-ups.
"""

from __future__ import annotations

import io
import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.annotate import AnnotateConfig, run_annotate
from pipeline.inputs import image_files
from pipeline.inputs.decode import decode_sample
from pipeline.inputs.sources import expand_shards, open_shard
from pipeline.annotate.stages import ModelStageConfig

from tests.pipeline.corpus import corrupt_jpeg, encode, good_jpeg, good_png, gradient_rgb, sidecar
from tests.pipeline.annotate.test_exactly_once import JobProcess, assert_equals_reference, check_visible, committed_output, manifest_count

PER_SHARD = 4
SEED = 77
TIMEOUT_S = 240.0


def _webp(width: int, height: int) -> bytes:
    from PIL import Image

    return encode(Image.fromarray(gradient_rgb(width, height)), "WEBP", quality=90)


def write_folder(root: Path, n: int = 60) -> dict[str, str]:
    """``n`` files under ``root`` (nested); returns key -> expected status. The hidden file gets no row."""
    expected: dict[str, str] = {}
    makers = (lambda w, h: ("jpg", good_jpeg(w, h)), lambda w, h: ("png", good_png(w, h)),
              lambda w, h: ("webp", _webp(w, h)))
    for i in range(n - 3):
        ext, data = makers[i % 3](40 + 4 * (i % 7), 32 + 6 * (i % 5))
        key = f"{('a', 'a/b', 'c', '')[i % 4]}/img{i:03d}.{ext}".lstrip("/")
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
        expected[key] = "ok"
    for key, data in (("a/b/broken.jpg", corrupt_jpeg()), ("notes.txt", b"not an image\n"), ("c/empty.png", b"")):
        (root / key).write_bytes(data)
        expected[key] = "decode_error"
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return expected


def _files(root: Path, keys: list[str]) -> None:
    for i, key in enumerate(keys):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(good_jpeg(36 + 2 * (i % 9), 30 + 3 * (i % 4)))


# ----------------------------------------------------------------------------------------------------------------
# Listing and reading


def test_folder_becomes_sorted_virtual_shards_with_relative_keys(tmp_path: Path) -> None:
    expected = write_folder(tmp_path / "photos")
    refs = expand_shards(str(tmp_path / "photos"), images_per_shard=7)
    keys = [k for r in refs for k in r.keys]
    assert keys == sorted(expected) and len(keys) == 60  # every file once, hidden one left out
    assert [r.name for r in refs] == [f"photos-img-{i:06d}" for i in range(9)]
    assert [len(r.members) for r in refs] == [7] * 8 + [4]
    assert all(m.startswith(str(tmp_path / "photos")) for r in refs for m in r.members)
    # the same listing gives the same shards; another size gives other URLs (the resume check compares them)
    assert expand_shards(str(tmp_path / "photos"), images_per_shard=7) == refs
    assert expand_shards(str(tmp_path / "photos"), images_per_shard=8)[0].url != refs[0].url
    with pytest.raises(ValueError, match="images-per-shard"):
        expand_shards(str(tmp_path / "photos"), images_per_shard=0)


def test_globs_single_images_sidecars_and_tar_directories(tmp_path: Path) -> None:
    _files(tmp_path / "d", ["x/1.jpg", "x/2.jpg", "y/3.jpg"])
    (tmp_path / "d" / "x" / "1.json").write_bytes(sidecar(boxes=[[1, 1, 20, 20]]))
    refs = expand_shards(str(tmp_path / "d" / "x" / "*.jpg"))
    assert [r.keys for r in refs] == [("1.jpg", "2.jpg")]
    (one,) = expand_shards(str(tmp_path / "d" / "y" / "3.jpg"))
    assert one.keys == ("3.jpg",) and one.name == "3-img-000000"
    # a sidecar beside an image is its prompts, not a sample of its own
    (ref,) = expand_shards(str(tmp_path / "d"))
    assert ref.keys == ("x/1.jpg", "x/2.jpg", "y/3.jpg")
    samples = list(open_shard(ref))
    assert sorted(samples[0].files) == ["jpg", "json"] and sorted(samples[1].files) == ["jpg"]
    assert decode_sample(samples[0], require_prompts=True).status == "ok"
    assert decode_sample(samples[1], require_prompts=True).status == "no_prompts"
    # a directory of tars is still a directory of shards
    (tmp_path / "tars").mkdir()
    for name in ("b.tar", "a.tar"):
        (tmp_path / "tars" / name).write_bytes(b"")
    (tmp_path / "tars" / "_index.json").write_text("{}")
    assert [r.name for r in expand_shards(str(tmp_path / "tars"))] == ["a", "b"]
    # two inputs with the same base name get distinct shard names
    _files(tmp_path / "e" / "d", ["4.jpg"])
    names = [r.name for r in expand_shards([str(tmp_path / "d"), str(tmp_path / "e" / "d")])]
    assert len(set(names)) == 2 and all(n.startswith("d-") for n in names)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_url_lists_keep_row_order_and_resolve_relative_paths(tmp_path: Path, fmt: str) -> None:
    _files(tmp_path / "imgs", ["b.jpg", "a.jpg", "c.jpg"])
    entries = ["imgs/b.jpg", str(tmp_path / "imgs" / "a.jpg"), "imgs/c.jpg", "imgs/b.jpg"]
    path = tmp_path / f"list.{fmt}"
    table = pa.table({"id": list(range(4)), "image": entries})
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        path.write_text("id,image\n" + "".join(f"{i},{e}\n" for i, e in enumerate(entries)))
    else:
        path.write_text("".join(json.dumps({"id": i, "image": e}) + "\n" for i, e in enumerate(entries)))
    (ref,) = expand_shards(str(path), url_column="image")
    assert ref.keys == ("imgs/b.jpg", str(tmp_path / "imgs" / "a.jpg"), "imgs/c.jpg", "imgs/b.jpg#3")
    assert ref.name == "list-img-000000"
    statuses = [decode_sample(s).status for s in open_shard(ref)]
    assert statuses == ["ok"] * 4
    with pytest.raises(ValueError, match=r"no column 'url' .*--url-column"):
        expand_shards(str(path))


def test_unreadable_files_are_rows_and_transient_failures_fail_the_shard(tmp_path: Path, monkeypatch) -> None:
    _files(tmp_path / "d", ["1.jpg", "2.jpg", "3.jpg"])
    (ref,) = expand_shards(str(tmp_path / "d"))
    (tmp_path / "d" / "2.jpg").unlink()  # gone between listing and reading
    reader = open_shard(ref)
    samples = list(reader)
    assert [s.key for s in samples] == ["1.jpg", "2.jpg", "3.jpg"]
    assert "could not read the file: FileNotFoundError" in samples[1].errors[0]
    assert decode_sample(samples[1]).status == "decode_error"
    assert reader.report.samples_read == 3 and not reader.report.read_failed

    def flaky(url, storage_options=None, **kw):
        raise ConnectionError("the store is down")

    monkeypatch.setattr(image_files, "open_with_retry", flaky)
    reader = open_shard(ref)
    assert list(reader) == []
    assert reader.report.read_failed and "kept failing: ConnectionError" in reader.report.error


# ----------------------------------------------------------------------------------------------------------------
# The job: one row per file, exactly once through driver kills, a changed listing refused


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("image-inputs")
    expected = {("folder", k): s for k, s in write_folder(root / "folder").items()}
    listed = [f"more/{i // 10}/m{i:02d}.jpg" for i in range(40)]
    _files(root / "lists", listed)
    pq.write_table(pa.table({"url": listed}), root / "lists" / "more.parquet")
    expected.update({("more", k): "ok" for k in listed})
    vocab = root / "classes.txt"
    vocab.write_text("red square\nblue circle\n")
    return {"root": root, "inputs": [str(root / "folder"), str(root / "lists" / "more.parquet")],
            "vocab": str(vocab), "expected": expected}


def _argv(inputs: dict[str, Any], out: Path) -> list[str]:
    argv = []
    for i in inputs["inputs"]:
        argv += ["--input", i]
    return argv + ["--output", str(out), "--vocabulary", inputs["vocab"], "--prompts", "whole-image",
                   "--images-per-shard", str(PER_SHARD), "--batch-size", "4", "--workers", "2",
                   "--cpus-per-worker", "1", "--ray-address", "local"]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> dict[str, Any]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path_factory.mktemp("image-inputs-ref") / "out"
        cfg = AnnotateConfig(inputs=tuple(inputs["inputs"]), output=str(out),
                             stage=ModelStageConfig(model="ovsam-tiny", vocabulary=inputs["vocab"],
                                                    prompts="whole-image"),
                             batch_size=4, workers=1, cpus_per_worker=1, images_per_shard=PER_SHARD)
        summary = run_annotate(cfg)
    finally:
        ray.shutdown()
    assert not summary.failed
    ref = committed_output(out)
    ref["out"] = out
    return ref


def test_every_file_gets_one_row_with_its_status(inputs, reference) -> None:
    got = {}
    for row in reference["images"]:
        origin = "more" if row["shard"].startswith("more-") else "folder"
        got[(origin, row["image_key"])] = row["status"]
    assert got == inputs["expected"]
    assert len(reference["manifests"]) == 15 + 10  # 60 files and 40 list entries, 4 per shard
    errors = {r["image_key"]: r["error"] for r in reference["images"] if r["status"] != "ok"}
    assert "not an image file (extension .txt" in errors["notes.txt"]
    assert "empty (0 bytes)" in errors["c/empty.png"] and "corrupt" in errors["a/b/broken.jpg"]
    ok = sum(1 for r in reference["images"] if r["status"] == "ok")
    assert len(reference["instances"]) == ok  # whole-image prompts: one instance per decoded image


def test_driver_killed_three_times_then_rerun_equals_reference(inputs, reference, tmp_path, capsys) -> None:
    rng = random.Random(SEED)
    out = tmp_path / "out"
    rounds = [("delay", rng.uniform(2.0, 6.0), False), ("manifests", rng.randint(2, 4), False),
              ("manifests", rng.randint(2, 4), True)]
    total = len(reference["manifests"])
    for i, (trigger, value, driver_only) in enumerate(rounds):
        before = check_visible(out)
        with JobProcess(_argv(inputs, out), tmp_path / f"round{i}.log") as job:
            t0 = time.monotonic()
            while not (trigger == "delay" and time.monotonic() - t0 >= value
                       or trigger == "manifests" and manifest_count(out) >= before + value):
                assert job.proc.poll() is None, f"round {i} ended before its kill point:\n{job.output()}"
                assert time.monotonic() - t0 < TIMEOUT_S, f"round {i}: no kill point:\n{job.output()}"
                time.sleep(0.05)
            job.kill(driver_group_only=driver_only)
            job.reap(grace_s=10.0 if driver_only else 0.0)
        assert job.proc.returncode == -signal.SIGKILL
    committed = check_visible(out)
    assert committed < total
    with JobProcess(_argv(inputs, out), tmp_path / "final.log") as job:
        t0 = time.monotonic()
        while job.proc.poll() is None:
            assert time.monotonic() - t0 < TIMEOUT_S, f"the final run did not finish:\n{job.output()}"
            time.sleep(0.1)
        job.reap(grace_s=10.0)
    assert job.proc.returncode == 0, job.output()
    assert f"{committed} committed, {total - committed} to process" in job.output()
    assert_equals_reference(out, reference)


def test_a_changed_listing_is_refused_before_anything_is_written(inputs, reference, tmp_path) -> None:
    import shutil

    from jobs.cli import main

    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    folder = tmp_path / "folder"
    shutil.copytree(inputs["root"] / "folder", folder)
    (folder / "a" / "aaa-new.jpg").write_bytes(good_jpeg(40, 40))  # shifts every later file to another shard
    argv = ["annotate", "--input", str(folder), "--input", inputs["inputs"][1]] + _argv(inputs, out)[4:]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(argv) == 2
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["annotate", *_argv(inputs, out)]) == 0  # the original listing resumes: nothing to do


def test_show_draws_images_of_virtual_shards(reference, tmp_path) -> None:
    from pipeline.export.overlay import write_overlays

    paths = write_overlays(str(reference["out"]), tmp_path / "show", limit=3)
    assert len(paths) == 3 and all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert all(p.name.startswith("folder-img-000000__") for p in paths)
    assert io.BytesIO(paths[0].read_bytes()).read(8) == b"\x89PNG\r\n\x1a\n"


def test_show_html_is_one_self_contained_filterable_page(reference, tmp_path, capsys) -> None:
    from html.parser import HTMLParser

    from jobs.cli import main

    assert main(["show", "--input", str(reference["out"]), "--output", str(tmp_path / "show"), "-n", "6",
                 "--html"]) == 0
    page = (tmp_path / "show" / "index.html").read_text()

    class Parse(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.srcs, self.items, self.options, self.figures = [], [], [], 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.srcs.append(a["src"])
            elif tag == "li":
                self.items.append((a["data-label"], float(a["data-score"])))
            elif tag == "option" and a.get("value"):
                self.options.append(a["value"])
            elif tag == "figure":
                self.figures += 1
            assert not a.get("href") and tag != "link", "the page must not load other files"

    p = Parse()
    p.feed(page)
    assert p.figures == 6 and len(p.srcs) == 6 and all(s.startswith("data:image/jpeg;base64,") for s in p.srcs)
    shown = [r for r in reference["instances"] if r["shard"] == "folder-img-000000"
             or r["shard"] == "folder-img-000001"]
    assert sorted(p.options) == sorted({label for label, _ in p.items})
    assert len(p.items) >= 1 and all(0.0 <= s <= 1.0 for _, s in p.items)
    assert {label for label, _ in p.items} <= {r["label_name"] for r in shown}
    assert 'id="score"' in page and 'id="label"' in page
