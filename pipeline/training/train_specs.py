"""The training mixture's command-line specs (``--dataset name=URL:kind:weight``, ``--heldout name=URL``),
parsed without importing torch, so the command line stays fast."""

from __future__ import annotations

import math
from dataclasses import dataclass

from schemas.training import KINDS


@dataclass(frozen=True)
class DatasetSpec:
    """One training dataset of the mixture: ``name=URL:kind:weight``."""

    name: str
    url: str
    kind: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or "=" in self.name:
            raise ValueError(f"dataset name must be non-empty and without '=', got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"dataset {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (self.weight > 0 and math.isfinite(self.weight)):
            raise ValueError(f"dataset {self.name!r}: sampling weight must be a positive number, got {self.weight}")


def parse_dataset_spec(text: str) -> DatasetSpec:
    """``name=URL:kind:weight`` (``:weight`` optional, default 1); the URL may itself contain ``:``
    (``s3://``), so kind and weight are taken from the right."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--dataset {text!r}: expected name=URL:kind:weight, e.g. "
                         f"lvis=s3://bucket/lvis/:mask:1")
    parts = rest.rsplit(":", 2)
    if len(parts) == 3 and parts[1] in KINDS:
        url, kind, weight_text = parts
    else:
        url, _, kind = rest.rpartition(":")
        weight_text = "1"
    if kind not in KINDS or not url:
        raise ValueError(f"--dataset {text!r}: expected name=URL:kind:weight with kind one of {', '.join(KINDS)}")
    try:
        weight = float(weight_text)
    except ValueError:
        raise ValueError(f"--dataset {text!r}: the weight {weight_text!r} is not a number") from None
    return DatasetSpec(name, url, kind, weight)


def parse_heldout_spec(text: str) -> tuple[str, str]:
    """``name=URL`` of a held-out shard set."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise ValueError(f"--heldout {text!r}: expected name=URL, e.g. lvis=s3://bucket/lvis-val/")
    return name, url
