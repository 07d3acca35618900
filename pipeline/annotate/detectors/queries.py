"""The text queries an open-vocabulary detector is asked: every synonym of every class not excluded, through a
template (``a photo of a {}`` by default), each remembering its class."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.annotate.detectors.spec import DEFAULT_TEMPLATE, check_template


@dataclass(frozen=True)
class TextQueries:
    """``texts[q]`` asks for class ``classes[q]`` (an index into ``names``, the vocabulary's display names).
    Excluded classes have no query, so they are never proposed. ``key`` identifies the query set (texts and
    their classes): detectors cache query embeddings under it."""

    texts: tuple[str, ...]
    classes: np.ndarray
    names: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.texts:
            raise ValueError("the vocabulary has no usable names to query the detector with (every class is "
                             "excluded, or no class has a synonym)")
        classes = np.asarray(self.classes, dtype=np.int64)
        if classes.shape != (len(self.texts),) or classes.min() < 0 or classes.max() >= len(self.names):
            raise ValueError("every query needs the index of its class")
        object.__setattr__(self, "classes", classes)
        digest = hashlib.sha256(json.dumps([list(self.texts), classes.tolist(), list(self.names)]).encode())
        object.__setattr__(self, "key", digest.hexdigest())

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_synonyms(cls, names: Sequence[str], synonyms: Sequence[Sequence[str]], *,
                      split: Any = None, template: str = DEFAULT_TEMPLATE) -> TextQueries:
        """One query per synonym (duplicates within a class dropped, blanks skipped) of each class whose split is
        not 0 (excluded)."""
        check_template(template)
        texts: list[str] = []
        classes: list[int] = []
        for c, syns in enumerate(synonyms):
            if split is not None and int(split[c]) == 0:
                continue
            seen = set()
            for s in syns:
                s = " ".join(str(s).replace("_", " ").split())
                if s and s not in seen:
                    seen.add(s)
                    texts.append(template.format(s))
                    classes.append(c)
        return cls(tuple(texts), np.asarray(classes, dtype=np.int64), tuple(str(n) for n in names), template)

    @classmethod
    def from_vocabulary(cls, vocabulary: Any, template: str = DEFAULT_TEMPLATE) -> TextQueries:
        """The queries of an ``ovsam.Vocabulary`` (its names, synonyms and split)."""
        return cls.from_synonyms(vocabulary.names, vocabulary.synonyms, split=vocabulary.split, template=template)

    @classmethod
    def from_text(cls, text: str | Sequence[str], template: str = DEFAULT_TEMPLATE) -> TextQueries:
        """Classes typed by a person: ``"traffic cone,pastry"`` or ``["traffic cone", "pastry"]``; each class is
        its own only synonym."""
        items = str(text).split(",") if isinstance(text, str) else [str(t) for t in text]
        names = []
        for item in items:
            item = " ".join(item.split())
            if item and item not in names:
                names.append(item)
        return cls.from_synonyms(names, [[n] for n in names], template=template)

    def chunks(self, size: int) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges of at most ``size`` queries."""
        size = max(1, int(size))
        return [(s, min(s + size, len(self))) for s in range(0, len(self), size)]
