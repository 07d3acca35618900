"""Training shard format: what ``ovsam pack`` writes and the training jobs read.

A packed dataset is a directory (any fsspec URL) holding

``<prefix>-NNNNNN.tar``
    WebDataset shards. Each sample is two tar members sharing a key: ``<key>.<ext>`` with the original image
    bytes, never re-encoded (``ext`` names the image format: ``jpg``, ``png``, ``webp``, ...), and ``<key>.json``,
    the sidecar :class:`TrainingRecord`::

        {"dataset": "coco", "kind": "image" | "box" | "mask", "width": 640, "height": 480,
         "source_id": 391895 | "sa_1",              # the sample's id in its source dataset
         "labels": [3, 17, ...],                    # one class index per box (into classes.json); -1 = class-agnostic
         "boxes": [[x0, y0, x1, y1], ...],          # float pixels of the original (stored) image; [] for "image"
         "masks": [{"size": [h, w], "counts": "..."}, ...],   # compressed COCO RLE, "mask" only, same order as boxes
         "image_labels": [5]}                       # image-level class indices, "image" only

    Keys are unique within a dataset and tar-safe: one or more ``/``-separated parts of ``[A-Za-z0-9_-]``, no
    ``.`` (WebDataset splits a member name at the first dot of its base name), at most :data:`MAX_KEY_LENGTH`
    characters (so every member name fits a plain ustar header). :func:`make_key` builds them.

``classes.json``
    The vocabulary, :class:`ClassesFile`::

        {"format": "ovsam-classes", "version": 1, "dataset": "lvis", "kind": "mask",
         "classes": ["aerosol can,spray can", ...],      # one entry per class index: "name,synonym,..."
         "split": ["base" | "novel" | "excluded", ...] or null,
         "ids": [1, 2, ...] or null,                      # each class's id in the source (category id, WordNet id)
         "source": {...}}                                 # what was packed, with which settings, and their hash

    A class-agnostic dataset (SA-1B) has ``"classes": []``. ``ovsam.Vocabulary.resolve`` accepts this file.

``_index.json``
    The shard index, :class:`ShardEntry` per shard basename::

        {"coco-000000.tar": {"num_samples": 1000, "bytes": 163840000, "first_item": 0, "num_items": 1000,
                             "sha256": "..."}, ...}

    ``first_item`` is the position of the shard's first source item in the packer's deterministic item order and
    ``num_items`` how many items the shard consumed (more than ``num_samples`` when unreadable items were
    skipped), so a resumed run starts at ``first_item + num_items`` of the last shard. The annotation job's reader
    uses ``num_samples`` to detect truncated shards.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

KINDS = ("image", "box", "mask")
SPLITS = ("base", "novel", "excluded")
CLASSES_FORMAT = "ovsam-classes"
CLASSES_VERSION = 1
CLASSES_FILE = "classes.json"
INDEX_FILE = "_index.json"
AGNOSTIC_LABEL = -1
MAX_KEY_LENGTH = 80

_KEY = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(*parts: str | int) -> str:
    """A tar-safe sample key from the parts of a source id (e.g. ``make_key("n01440764", "n01440764_10026")``).

    Each part keeps ``[A-Za-z0-9_-]`` and turns every other run of characters into ``_``; parts are joined with
    ``/``. When that changed anything, or the key would be longer than :data:`MAX_KEY_LENGTH`, 10 hex digits of
    the original text's SHA-1 are appended, so distinct sources keep distinct keys.
    """
    import hashlib

    texts = [str(p) for p in parts]
    if not texts or any(t == "" for t in texts):
        raise ValueError(f"a sample key needs non-empty parts, got {texts!r}")
    safe = [_UNSAFE.sub("_", t) for t in texts]
    key = "/".join(safe)
    if safe != texts or len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1("/".join(texts).encode("utf-8")).hexdigest()[:10]
        key = f"{key[: MAX_KEY_LENGTH - 11]}_{digest}"
    assert _KEY.match(key), key
    return key


def is_valid_key(key: str) -> bool:
    """Whether ``key`` is a tar-safe sample key (see :func:`make_key`)."""
    return isinstance(key, str) and len(key) <= MAX_KEY_LENGTH and bool(_KEY.match(key))


def _fail(where: str, expected: str, got: Any) -> ValueError:
    text = repr(got)
    return ValueError(f"{where}: expected {expected}, got {text if len(text) <= 80 else text[:77] + '...'}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int_list(value: Any, where: str, minimum: int) -> list[int]:
    if not isinstance(value, list):
        raise _fail(where, "a list of integers", value)
    for i, v in enumerate(value):
        if not _is_int(v) or v < minimum:
            raise _fail(f"{where}[{i}]", f"an integer >= {minimum}", v)
    return list(value)


@dataclass(frozen=True)
class TrainingRecord:
    """The JSON sidecar of one training sample (see the module docstring). Construction validates every field
    and raises ``ValueError`` naming the first bad one."""

    dataset: str
    kind: str
    width: int
    height: int
    source_id: str | int
    labels: list[int] = field(default_factory=list)
    boxes: list[list[float]] = field(default_factory=list)
    masks: list[dict[str, Any]] = field(default_factory=list)
    image_labels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        w = "training record field"
        if not isinstance(self.dataset, str) or not self.dataset:
            raise _fail(f"{w} 'dataset'", "a non-empty string", self.dataset)
        if self.kind not in KINDS:
            raise _fail(f"{w} 'kind'", f"one of {KINDS}", self.kind)
        for name in ("width", "height"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise _fail(f"{w} '{name}'", "a positive integer", v)
        if not (isinstance(self.source_id, str) or _is_int(self.source_id)):
            raise _fail(f"{w} 'source_id'", "a string or an integer", self.source_id)
        labels = _int_list(self.labels, f"{w} 'labels'", AGNOSTIC_LABEL)
        if not isinstance(self.boxes, list):
            raise _fail(f"{w} 'boxes'", "a list of [x0, y0, x1, y1]", self.boxes)
        boxes = []
        for i, box in enumerate(self.boxes):
            if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
                raise _fail(f"{w} 'boxes'[{i}]", "4 finite numbers [x0, y0, x1, y1]", box)
            if box[2] < box[0] or box[3] < box[1]:
                raise _fail(f"{w} 'boxes'[{i}]", "x0 <= x1 and y0 <= y1", box)
            boxes.append([float(v) for v in box])
        if not isinstance(self.masks, list):
            raise _fail(f"{w} 'masks'", "a list of COCO RLE dicts", self.masks)
        masks = []
        for i, rle in enumerate(self.masks):
            ok = (isinstance(rle, dict) and set(rle) == {"size", "counts"} and isinstance(rle["counts"], str)
                  and isinstance(rle["size"], (list, tuple)) and len(rle["size"]) == 2)
            if not ok:
                raise _fail(f"{w} 'masks'[{i}]", 'a compressed COCO RLE {"size": [h, w], "counts": str}', rle)
            if list(rle["size"]) != [self.height, self.width]:
                raise _fail(f"{w} 'masks'[{i}]['size']", f"[height, width] = {[self.height, self.width]}",
                            rle["size"])
            masks.append({"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]})
        image_labels = _int_list(self.image_labels, f"{w} 'image_labels'", 0)
        if len(labels) != len(boxes):
            raise ValueError(f"{w} 'labels': expected one label per box ({len(boxes)}), got {len(labels)}")
        if self.kind == "image":
            if boxes:
                raise _fail(f"{w} 'boxes'", "[] for an image-level sample", self.boxes)
            if not image_labels:
                raise _fail(f"{w} 'image_labels'", "at least one class index for an image-level sample",
                            self.image_labels)
        elif image_labels:
            raise _fail(f"{w} 'image_labels'", f"[] for a {self.kind}-level sample", self.image_labels)
        if self.kind == "mask" and len(masks) != len(boxes):
            raise ValueError(f"{w} 'masks': expected one mask per box ({len(boxes)}), got {len(masks)}")
        if self.kind != "mask" and masks:
            raise _fail(f"{w} 'masks'", f"[] for a {self.kind}-level sample", f"{len(masks)} masks")
        for name, value in (("labels", labels), ("boxes", boxes), ("masks", masks), ("image_labels", image_labels)):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        """Compact JSON with the fields in declaration order."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> TrainingRecord:
        if not isinstance(data, dict):
            raise _fail("training record", "a JSON object", data)
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"training record: unknown field(s) {unknown}; expected {sorted(names)}")
        missing = [n for n in ("dataset", "kind", "width", "height", "source_id") if n not in data]
        if missing:
            raise ValueError(f"training record field {missing[0]!r}: missing")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> TrainingRecord:
        """Parse and validate a sidecar; ``ValueError`` names the bad field (or says the text is not JSON)."""
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"training record: not valid JSON: {e}") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class ClassesFile:
    """``classes.json``: the dataset's classes (``"name,synonym,..."`` per class index), their base/novel split,
    their source ids and a free-form ``source`` description."""

    dataset: str
    kind: str
    classes: list[str]
    split: list[str] | None = None
    ids: list[str | int] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    format: str = CLASSES_FORMAT
    version: int = CLASSES_VERSION

    def __post_init__(self) -> None:
        w = "classes file field"
        if self.format != CLASSES_FORMAT:
            raise _fail(f"{w} 'format'", repr(CLASSES_FORMAT), self.format)
        if self.version != CLASSES_VERSION:
            raise _fail(f"{w} 'version'", str(CLASSES_VERSION), self.version)
        if not isinstance(self.dataset, str) or not self.dataset:
            raise _fail(f"{w} 'dataset'", "a non-empty string", self.dataset)
        if self.kind not in KINDS:
            raise _fail(f"{w} 'kind'", f"one of {KINDS}", self.kind)
        if not isinstance(self.classes, list):
            raise _fail(f"{w} 'classes'", "a list of strings", self.classes)
        for i, c in enumerate(self.classes):
            if not isinstance(c, str) or not any(s.strip() for s in c.split(",")):
                raise _fail(f"{w} 'classes'[{i}]", "a non-empty 'name,synonym,...' string", c)
        for name, check, what in (("split", lambda v: v in SPLITS, f"one of {SPLITS}"),
                                  ("ids", lambda v: isinstance(v, str) or _is_int(v), "a string or an integer")):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, list) or len(value) != len(self.classes):
                raise _fail(f"{w} {name!r}", f"null or a list with one entry per class ({len(self.classes)})",
                            value)
            for i, v in enumerate(value):
                if not check(v):
                    raise _fail(f"{w} {name!r}[{i}]", what, v)
        if not isinstance(self.source, dict):
            raise _fail(f"{w} 'source'", "a JSON object", self.source)

    @property
    def class_agnostic(self) -> bool:
        return not self.classes

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "dataset": self.dataset, "kind": self.kind,
                "classes": list(self.classes), "split": self.split, "ids": self.ids, "source": self.source}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Any) -> ClassesFile:
        if not isinstance(data, dict):
            raise _fail("classes file", "a JSON object", data)
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"classes file: unknown field(s) {unknown}; expected {sorted(names)}")
        for required in ("format", "dataset", "kind", "classes"):
            if required not in data:
                raise ValueError(f"classes file field {required!r}: missing")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> ClassesFile:
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"classes file: not valid JSON: {e}") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class ShardEntry:
    """One shard's line in ``_index.json``."""

    num_samples: int
    bytes: int
    first_item: int
    num_items: int
    sha256: str

    def __post_init__(self) -> None:
        for name in ("num_samples", "bytes", "first_item", "num_items"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise _fail(f"shard index field {name!r}", "a non-negative integer", v)
        if self.num_items < self.num_samples:
            raise ValueError(f"shard index field 'num_items': expected >= num_samples ({self.num_samples}), got "
                             f"{self.num_items}")
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise _fail("shard index field 'sha256'", "64 lowercase hex digits", self.sha256)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def index_to_json(index: dict[str, ShardEntry]) -> str:
    """``_index.json`` text, shards in name order."""
    return json.dumps({name: index[name].to_dict() for name in sorted(index)}, indent=1)


def index_from_json(text: str | bytes) -> dict[str, ShardEntry]:
    """Parse ``_index.json``; ``ValueError`` names the shard and field at fault."""
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"shard index: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _fail("shard index", "a JSON object {shard basename: entry}", data)
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != set(ShardEntry.__dataclass_fields__):
            raise _fail(f"shard index entry {name!r}", f"an object with {sorted(ShardEntry.__dataclass_fields__)}",
                        entry)
        try:
            out[name] = ShardEntry(**entry)
        except ValueError as e:
            raise ValueError(f"shard index entry {name!r}: {e}") from None
    return out
