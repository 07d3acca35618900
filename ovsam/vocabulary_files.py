"""Vocabulary files and class-list data: reading text class lists and packed datasets' ``classes.json``, telling
which kind of source a vocabulary spec names, writing and reading the safetensors file of a saved vocabulary, and
the checks every class list must pass (names, synonyms, base/novel/excluded split).

Everything here works on plain data (names, synonyms, split, embeddings, metadata);
:class:`ovsam.vocabulary.Vocabulary` builds itself from it and exposes these readers as its ``read_*``, ``save``
and ``load`` methods.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .class_lists import BUILTINS, SPLIT_NAMES, plain_synonyms

if TYPE_CHECKING:
    import torch

FILE_FORMAT = "ovsam-vocabulary"
FILE_VERSION = "1"
# ``ovsam pack`` writes these into classes.json (schemas/training.py, which this package must not import)
CLASSES_FORMAT_KEY = "format"
CLASSES_FORMAT = "ovsam-classes"


def read_class_file(path: str | Path) -> tuple[list[list[str]], list[int] | None]:
    """Read a UTF-8 text class list.

    One class per line, comma-separated synonyms (``couch, sofa``); ``#`` starts a comment anywhere on a
    line; blank lines are skipped. A line may end with ``| base``, ``| novel`` or ``| excluded``; either every
    class line has such a tag or none does. Returns ``(synonyms per class, split or None)``; the display name
    of a class is its first synonym. Malformed lines raise ``ValueError`` with ``path:line``.
    """
    classes: list[list[str]] = []
    tags: list[int | None] = []
    for lineno, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tag = None
        if "|" in line:
            line, _, t = line.rpartition("|")
            t = t.strip().lower()
            if t not in SPLIT_NAMES or "|" in line:
                raise ValueError(f"{path}:{lineno}: expected 'synonyms | base|novel|excluded', got {raw!r}")
            tag = SPLIT_NAMES[t]
        syn = plain_synonyms(line)
        if not syn:
            raise ValueError(f"{path}:{lineno}: no class name on this line: {raw!r}")
        classes.append(syn)
        tags.append(tag)
    if not classes:
        raise ValueError(f"{path}: no classes found (one class per line, comma-separated synonyms)")
    if all(t is None for t in tags):
        return classes, None
    if any(t is None for t in tags):
        missing = [classes[i][0] for i, t in enumerate(tags) if t is None][:5]
        raise ValueError(f"{path}: split tags must be on every line or on none; untagged classes: {missing}")
    return classes, [int(t) for t in tags if t is not None]


def read_classes_json(path: str | Path) -> tuple[list[str], list[list[str]], list[int] | None]:
    """Read the ``classes.json`` of a packed training dataset (``ovsam pack``; format in
    ``schemas/training.py``): ``(display names, synonyms per class, split or None)``.

    Each class entry is ``"name,synonym,..."``; the display name is the first synonym, with the class's source
    id (``ids``) or index appended where that name is ambiguous. Raises ``ValueError`` naming the file for
    anything else, and for a class-agnostic dataset (no classes), which cannot serve as a vocabulary.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON classes file: {e}") from None
    if not isinstance(data, dict) or data.get(CLASSES_FORMAT_KEY) != CLASSES_FORMAT:
        raise ValueError(f"{path}: expected a classes file with \"format\": \"{CLASSES_FORMAT}\" (written by "
                         f"`ovsam pack`)")
    classes, split, ids = data.get("classes"), data.get("split"), data.get("ids")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: 'classes' must be a list of 'name,synonym,...' strings")
    if not classes:
        raise ValueError(f"{path}: dataset {data.get('dataset')!r} is class-agnostic (no classes), so it cannot "
                         f"be used as a vocabulary; pass a built-in name or a class list instead")
    for name, value in (("split", split), ("ids", ids)):
        if value is not None and (not isinstance(value, list) or len(value) != len(classes)):
            raise ValueError(f"{path}: {name!r} must be null or have one entry per class ({len(classes)})")
    synonyms = []
    for i, entry in enumerate(classes):
        syn = plain_synonyms(entry)
        if not syn:
            raise ValueError(f"{path}: class {i} ({entry!r}) has no name")
        synonyms.append(syn)
    counts: dict[str, int] = {}
    for syn in synonyms:
        counts[syn[0]] = counts.get(syn[0], 0) + 1
    names = [s[0] if counts[s[0]] == 1 else f"{s[0]} ({ids[i] if ids is not None else i})"
             for i, s in enumerate(synonyms)]
    if split is not None:
        bad = [s for s in split if s not in SPLIT_NAMES]
        if bad:
            raise ValueError(f"{path}: split values must be base, novel or excluded; got {bad[0]!r}")
        split = [SPLIT_NAMES[s] for s in split]
    return names, synonyms, split


def spec_kind(spec: str | Path) -> tuple[str, str | Path]:
    """What a vocabulary spec names, as ``(kind, source)``: ``("builtin", name)`` for a built-in class list, or
    for an existing file ``("saved", path)`` (written by :func:`write_saved`), ``("classes_json", path)`` (a
    packed dataset's ``classes.json``) or ``("class_file", path)`` (a text class list). Raises ``ValueError`` for
    anything else."""
    text = str(spec)
    if text in BUILTINS:
        return "builtin", text
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"vocabulary {text!r} is neither a built-in ({', '.join(BUILTINS)}) nor a file")
    if is_saved(path):
        return "saved", path
    if is_classes_json(path):
        return "classes_json", path
    return "class_file", path


def write_saved(path: str | Path, embeddings: torch.Tensor, meta: dict[str, Any], content_hash: str) -> Path:
    """Write one safetensors file (``embeddings`` + the JSON ``meta`` and the content hash), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    header = {"format": FILE_FORMAT, "version": FILE_VERSION, "meta": json.dumps(meta),
              "content_hash": content_hash}
    tmp = path.with_name(path.name + ".tmp")
    save_file({"embeddings": embeddings.detach().cpu().contiguous()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def read_saved(path: str | Path) -> dict[str, Any]:
    """The fields of a file written by :func:`write_saved`, as ``Vocabulary`` keyword arguments (``names``,
    ``synonyms``, ``embeddings``, ``split``, ``clip_model``, ``templates``, ``content_hash``), unchecked. Raises
    ``ValueError`` naming the file if it is not one, or if its metadata is malformed."""
    from safetensors import safe_open

    path = Path(path)
    if not is_saved(path):
        raise ValueError(f"{path} is not a saved ovsam vocabulary (expected a safetensors file written by "
                         f"Vocabulary.save)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        emb = f.get_tensor("embeddings") if "embeddings" in f.keys() else None
    try:
        if emb is None:
            raise ValueError("no 'embeddings' tensor")
        info = json.loads(meta["meta"])
        split = None if info["split"] is None else np.asarray(info["split"], dtype=np.int64)
        return {"names": info["names"], "synonyms": info["synonyms"], "embeddings": emb, "split": split,
                "clip_model": info["clip_model"], "templates": tuple(info["templates"]),
                "content_hash": meta.get("content_hash", "missing")}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {type(e).__name__}: {e}") from e


def check_classes(names: list[str], synonyms: list[list[str]]) -> None:
    """Raise ``ValueError`` unless there is at least one class, one synonym list per name, no empty name or
    synonym, and no duplicate name."""
    if not names:
        raise ValueError("a vocabulary needs at least one class")
    if len(names) != len(synonyms):
        raise ValueError(f"{len(names)} names but {len(synonyms)} synonym lists; expected one list per class")
    seen: dict[str, int] = {}
    for i, (n, syn) in enumerate(zip(names, synonyms)):
        if not n.strip():
            raise ValueError(f"class {i} has an empty name")
        if not syn:
            raise ValueError(f"class {i} ({n!r}) has no synonyms; expected at least one")
        empty = [j for j, s in enumerate(syn) if not s.strip()]
        if empty:
            raise ValueError(f"class {i} ({n!r}) has an empty synonym at position {empty[0]}: {syn!r}")
        if n in seen:
            raise ValueError(f"duplicate class name {n!r} at indices {seen[n]} and {i}")
        seen[n] = i


def check_split(split: Any, n: int) -> np.ndarray | None:
    """``split`` as ``[n]`` int8 (1 base, 2 novel, 0 excluded; the names "base"/"novel"/"excluded" are accepted),
    or None for None; raises ``ValueError`` for a wrong length or value."""
    if split is None:
        return None
    values = [SPLIT_NAMES.get(s, s) if isinstance(s, str) else s for s in list(split)]
    if len(values) != n:
        raise ValueError(f"split must have one entry per class ({n}), got {len(values)}")
    for i, v in enumerate(values):
        if isinstance(v, str) or v not in (0, 1, 2):
            raise ValueError(f"split values must be 1/'base', 2/'novel' or 0/'excluded'; class {i} has {v!r}")
    return np.asarray(values, dtype=np.int8)


def is_classes_json(path: Path) -> bool:
    """Whether ``path`` holds a JSON object (then it must be a packed dataset's ``classes.json``; text class lists
    never start with ``{``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.lstrip().startswith(b"{")


def is_saved(path: Path) -> bool:
    """Whether ``path`` is a safetensors file written by :func:`write_saved`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FILE_FORMAT
    except (SafetensorError, OSError, UnicodeDecodeError):
        return False
