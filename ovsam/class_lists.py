"""The built-in class lists (COCO, LVIS, ImageNet-21k) and the class-name normalisation rules."""

from __future__ import annotations

import functools
import importlib.util
import json
from importlib import resources
from pathlib import Path

import numpy as np

BASE, NOVEL, EXCLUDED = 1, 2, 0
SPLIT_NAMES = {"base": BASE, "novel": NOVEL, "excluded": EXCLUDED}
BUILTINS = ("coco", "lvis", "imagenet21k")


def split_label(name: str) -> list[str]:
    """The published class-name normalisation (OVSAM_SPEC §3.1 item 3): ``_or_`` and ``/`` separate synonyms,
    ``_`` becomes a space, lowercase, split on ``,``, strip, drop empties.

    >>> split_label("tape_(sticky_cloth_or_paper)")
    ['tape (sticky cloth', 'paper)']
    """
    text = name.replace("_or_", ",").replace("/", ",").replace("_", " ").lower()
    return [s.strip() for s in text.split(",") if s.strip()]


def plain_synonyms(name: str) -> list[str]:
    """User class strings: comma-separated synonyms, each stripped, empties dropped, case kept (the CLIP
    tokenizer lowercases)."""
    return [s.strip() for s in name.split(",") if s.strip()]


def builtin_class_list(name: str) -> tuple[list[str], list[list[str]], np.ndarray | None]:
    """``(display names, synonyms, split)`` of a built-in class list; see ``Vocabulary.class_list``."""
    if name == "coco":
        data = _load_json("coco_classes.json")["classes"]
        split = np.array([SPLIT_NAMES[c.get("ov_split", "excluded")] for c in data], dtype=np.int8)
        return [c["name"] for c in data], [list(c["synonyms"]) for c in data], split
    if name == "lvis":
        data = _load_json("lvis_classes.json")["classes"]
        split = np.array([SPLIT_NAMES[c.get("ov_split", "excluded")] for c in data], dtype=np.int8)
        return [c["name"] for c in data], [split_label(c["name"]) for c in data], split
    if name == "imagenet21k":
        names, synonyms = _imagenet21k()
        return list(names), [list(s) for s in synonyms], None
    raise ValueError(f"Unknown built-in vocabulary {name!r}; available: {', '.join(BUILTINS)}")


def _load_json(name: str) -> dict:
    return json.loads((resources.files("ovsam") / "data" / name).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _imagenet21k() -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    # timm ships the 21,841 fall11 synset ids and their lemmas; locating the package avoids importing timm.
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the imagenet21k vocabulary reads its class list from timm; install it: pip install timm")
    info = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"
    wnids = (info / "imagenet22k_synsets.txt").read_text(encoding="utf-8").split()
    lemmas = dict(line.split("\t", 1) for line in
                  (info / "imagenet_synset_to_lemma.txt").read_text(encoding="utf-8").splitlines() if "\t" in line)
    missing = [w for w in wnids if w not in lemmas]
    if missing:
        raise ValueError(f"timm's imagenet_synset_to_lemma.txt has no lemmas for {len(missing)} synsets, e.g. "
                         f"{missing[:3]}")
    synonyms = tuple(tuple(plain_synonyms(lemmas[w])) for w in wnids)
    counts: dict[str, int] = {}
    for s in synonyms:
        counts[s[0]] = counts.get(s[0], 0) + 1
    names = tuple(s[0] if counts[s[0]] == 1 else f"{s[0]} ({w})" for s, w in zip(synonyms, wnids))
    return names, synonyms
