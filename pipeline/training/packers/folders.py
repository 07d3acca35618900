"""The class-folder packer: ``root/<class folder>/<image>`` (ImageNet-21k/22k), class names from WordNet ids.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from schemas.training import ClassesFile, TrainingRecord, make_key

from pipeline.training.packers.writer import PackedSample, PackPlan
from pipeline.training.packers.common import IMAGE_SUFFIXES, class_text, open_fs, probe_image, read_image

logger = logging.getLogger(__name__)


def wordnet_lemmas() -> dict[str, str]:
    """WordNet id -> ``"lemma, lemma, ..."`` from timm's package data (ImageNet-21k/22k and ImageNet-1k synsets)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("class names for WordNet ids come from timm's data; install it: pip install timm")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / "imagenet_synset_to_lemma.txt"
    return dict(line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if "\t" in line)


@dataclass(frozen=True)
class _FolderItem:
    label: int
    path: str
    source_id: str
    key: str


def _entries(fs: Any, path: str) -> list[dict]:
    fs.invalidate_cache(path)
    return sorted(fs.ls(path, detail=True), key=lambda e: e["name"])


def plan_folders(root: str, *, dataset: str = "imagenet21k", storage_options: dict | None = None) -> PackPlan:
    """Plan packing ``root/<class folder>/<image>`` as image-level samples (ImageNet-21k/22k layout).

    Classes are the folders in name order; a folder named by a WordNet id (``n01440764``) gets its lemmas from
    timm's synset data as synonyms, any other folder name is used as the class name, with a warning. Images are
    files with an image suffix (case-insensitive) directly inside a class folder, in name order; keys are
    ``<folder>/<file stem>``.
    """
    fs, base = open_fs(root, storage_options)
    lemmas = wordnet_lemmas()
    stats: collections.Counter = collections.Counter()
    folders = []
    for entry in _entries(fs, base):
        if posixpath.basename(entry["name"].rstrip("/")).startswith("."):
            continue  # hidden: .cache, .ipynb_checkpoints, ...
        if entry["type"] == "directory":
            folders.append(entry["name"].rstrip("/"))
        else:
            stats["file_outside_class_folder"] += 1
    if not folders:
        raise ValueError(f"{root}: no class folders found; expected root/<class>/<image> (e.g. n01440764/*.JPEG)")
    texts, ids, items, unknown = [], [], [], []
    digest = hashlib.sha256()
    for label, folder in enumerate(folders):
        wnid = posixpath.basename(folder)
        if wnid in lemmas:
            texts.append(class_text(lemmas[wnid].split(",")))
        else:
            unknown.append(wnid)
            texts.append(class_text([wnid.replace("_", " ")]))
        ids.append(wnid)
        keys: set[str] = set()
        for entry in _entries(fs, folder):
            file_name = posixpath.basename(entry["name"])
            if entry["type"] != "file" or not file_name.lower().endswith(IMAGE_SUFFIXES):
                stats["not_an_image_file"] += 1
                continue
            key = make_key(wnid, file_name.rsplit(".", 1)[0])
            if key in keys:  # a.jpg next to a.png
                key = make_key(wnid, file_name)
            keys.add(key)
            digest.update(f"{wnid}/{file_name}\0{entry.get('size')}\n".encode())
            items.append(_FolderItem(label, entry["name"], f"{wnid}/{file_name}", key))
    if unknown:
        logger.warning("%d class folder(s) are not WordNet ids known to timm and are used as class names: %s",
                       len(unknown), ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else ""))

    def load(item: _FolderItem) -> PackedSample:
        raw = read_image(fs, item.path)
        ext, width, height = probe_image(raw)
        record = TrainingRecord(dataset=dataset, kind="image", width=width, height=height,
                                source_id=item.source_id, image_labels=[item.label])
        return PackedSample(item.key, ext, raw, record)

    classes = ClassesFile(dataset=dataset, kind="image", classes=texts, split=None, ids=ids,
                          source={"packer": "folders", "root": root, "unknown_folders": unknown})
    settings = {"packer": "folders", "root": root, "listing_sha256": digest.hexdigest(), "dataset": dataset}
    logger.info("%s: %d images in %d class folders", root, len(items), len(folders))
    return PackPlan(classes=classes, settings=settings, items=items, load=load, stats=dict(stats))


