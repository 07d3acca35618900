"""Whose label an evaluated instance carries (``ovsam eval coco --label-source``): OV-SAM's own, or the
open-vocabulary detector's that made its prompt, matched to the run's vocabulary."""

from __future__ import annotations

from typing import Any, Callable

#: ``--label-source``: whose label (and score) each instance is scored with (``pipeline.evaluation.coco``)
LABEL_SOURCES = ("ovsam", "detector")


def normalise_name(name: str) -> str:
    """Case-blind, ``_`` as a space, single spaces: ``"Traffic_Light "`` -> ``"traffic light"``."""
    return " ".join(str(name).lower().replace("_", " ").split())


class NoDetectorLabels(ValueError):
    """``--label-source detector`` on an output whose instances have no ``detector_label`` (a usage error)."""


def detector_class_index(classes: Any) -> Callable[[str], int | None]:
    """``detector_label`` -> class index: the class of that display name, else of that name compared case-blind
    with ``_`` as a space, else the one class with that synonym; None if none (or several) match."""
    exact = {n: i for i, n in enumerate(classes.names)}
    by_name: dict[str, list[int]] = {}
    by_synonym: dict[str, list[int]] = {}
    for i, name in enumerate(classes.names):
        by_name.setdefault(normalise_name(name), []).append(i)
        for syn in classes.synonyms[i]:
            ids = by_synonym.setdefault(normalise_name(syn), [])
            if i not in ids:
                ids.append(i)

    def lookup(label: str) -> int | None:
        if label in exact:
            return exact[label]
        key = normalise_name(label)
        for table in (by_name, by_synonym):
            ids = table.get(key, [])
            if len(ids) == 1:
                return ids[0]
        return None

    return lookup


