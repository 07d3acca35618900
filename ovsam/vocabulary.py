"""Vocabularies: class names + synonyms -> normalised CLIP text embeddings ``[C, P, D]`` (OVSAM_SPEC §3).

A vocabulary is data, not model state: it is built once with a model's CLIP text tower, saved to one file with
its names, synonyms, base/novel split, templates, CLIP model name and a content hash, and loaded by workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .templates import VILD_TEMPLATES

logger = logging.getLogger(__name__)

BASE, NOVEL, EXCLUDED = 1, 2, 0
SPLIT_NAMES = {"base": BASE, "novel": NOVEL, "excluded": EXCLUDED}
BUILTINS = ("coco", "lvis", "imagenet21k")
FILE_FORMAT = "ovsam-vocabulary"


def split_label(name: str) -> list[str]:
    """The published class-name normalisation: ``_or_`` and ``/`` separate synonyms, ``_`` becomes a space,
    lowercase, split on ``,``, strip, drop empties."""
    text = name.replace("_or_", ",").replace("/", ",").replace("_", " ").lower()
    return [s.strip() for s in text.split(",") if s.strip()]


def plain_synonyms(name: str) -> list[str]:
    """User class strings: comma-separated synonyms, stripped, empties dropped, case kept."""
    return [s.strip() for s in name.split(",") if s.strip()]


@dataclass
class Vocabulary:
    """C classes, each with P synonym prototypes of dimension D.

    Attributes:
      names: display name per class.
      synonyms: the texts embedded per class (the first one pads short classes).
      embeddings: ``[C, P, D]`` float32, every row unit-norm; classes with fewer than P synonyms repeat their
        first synonym's vector.
      split: ``[C]`` int8 in {1 base, 2 novel, 0 excluded}, or None (every class scored as novel, as published
        when no split is set).
      clip_model: name of the CLIP model whose text tower made the embeddings.
      templates: prompt templates averaged per synonym.
    """

    names: list[str]
    synonyms: list[list[str]]
    embeddings: torch.Tensor
    split: np.ndarray | None = None
    clip_model: str = ""
    templates: tuple[str, ...] = VILD_TEMPLATES
    content_hash: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        self.synonyms = [[str(s) for s in syn] for syn in self.synonyms]
        self.templates = tuple(self.templates)
        _check_classes(self.names, self.synonyms)
        emb = torch.as_tensor(self.embeddings, dtype=torch.float32)
        if emb.ndim != 3 or emb.shape[0] != len(self.names):
            raise ValueError(f"embeddings must have shape [C={len(self.names)}, P, D], got {tuple(emb.shape)}")
        self.embeddings = emb
        self.split = _check_split(self.split, len(self.names))
        computed = self._hash()
        if self.content_hash and self.content_hash != computed:
            raise ValueError(f"vocabulary content hash mismatch: stored {self.content_hash}, computed {computed}")
        self.content_hash = computed

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_names(
        cls,
        names: Sequence[str | Sequence[str]],
        model: Any,
        *,
        templates: Sequence[str] = VILD_TEMPLATES,
        split: Sequence[int | str] | np.ndarray | None = None,
        normalize: str = "plain",
        display_names: Sequence[str] | None = None,
        batch_size: int = 64,
        progress: bool = True,
        tokenizer: Any = None,
        clip_model: str | None = None,
        device: str | torch.device | None = None,
    ) -> "Vocabulary":
        """Embed class names with a model's CLIP text tower.

        Arguments:
          names: one entry per class: ``"couch,sofa"`` (comma-separated synonyms) or a list of synonyms.
          model: an OV-SAM model (uses its ``text`` tower, ``tokenizer`` and ``clip_model_name``) or an open_clip
            CLIP model together with ``tokenizer`` and ``clip_model``.
          split: per class ``1``/``"base"``, ``2``/``"novel"``, ``0``/``"excluded"``; None = no split.
          normalize: ``"plain"`` (strip) or ``"ovsam"`` (the published ``split_label`` rule) for string names.
          batch_size: synonyms encoded per forward pass (each with every template).

        Each synonym is embedded per template, every prompt embedding L2-normalised, averaged over the templates
        and L2-normalised again; the classifier scores the max over a class's synonyms.
        """
        if normalize not in ("plain", "ovsam"):
            raise ValueError(f"normalize must be 'plain' or 'ovsam', got {normalize!r}")
        synonyms: list[list[str]] = []
        for i, entry in enumerate(names):
            if isinstance(entry, str):
                syn = split_label(entry) if normalize == "ovsam" else plain_synonyms(entry)
            else:
                syn = [str(s).strip() for s in entry if str(s).strip()]
            if not syn:
                raise ValueError(f"class {i} ({entry!r}) has no synonyms after normalisation")
            synonyms.append(syn)
        display = list(display_names) if display_names is not None else [s[0] for s in synonyms]
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        clip_name = clip_model if clip_model is not None else getattr(model, "clip_model_name", None)
        if tok is None or clip_name is None:
            raise ValueError("from_names needs an OV-SAM model, or an open_clip model with tokenizer= and clip_model=")
        _check_classes(display, synonyms)
        emb = encode_synonyms(model, tok, synonyms, templates, batch_size=batch_size, progress=progress,
                              device=device)
        return cls(display, synonyms, emb, split=split, clip_model=clip_name, templates=tuple(templates))

    @classmethod
    def builtin_names(cls) -> list[str]:
        return list(BUILTINS)

    @classmethod
    def class_list(cls, name: str) -> tuple[list[str], list[list[str]], np.ndarray | None]:
        """``(display names, synonyms, split)`` of a built-in vocabulary, without any model.

        ``coco``: 80 classes with their synonym lists; split 48 base / 17 novel / 15 excluded.
        ``lvis``: 1203 classes named as published (``split_label`` of the LVIS name); 866 base / 337 novel.
        ``imagenet21k``: the 21,841 ImageNet-21k synsets with their WordNet lemmas as synonyms; no split.
        """
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
            return names, synonyms, None
        raise ValueError(f"Unknown built-in vocabulary {name!r}; available: {', '.join(BUILTINS)}")

    @classmethod
    def from_builtin(cls, name: str, model: Any, **kwargs: Any) -> "Vocabulary":
        """Embed a built-in class list (see :meth:`class_list`) with ``model``."""
        names, synonyms, split = cls.class_list(name)
        kwargs.setdefault("split", split)
        return cls.from_names(synonyms, model, display_names=names, **kwargs)

    @staticmethod
    def read_class_file(path: str | Path) -> tuple[list[list[str]], list[int] | None]:
        """Read a text class list: one class per line, comma-separated synonyms; ``#`` starts a comment; blank
        lines are skipped. A line may end with ``|base``, ``|novel`` or ``|excluded``; either every class line
        has such a tag or none does. Returns ``(synonyms per class, split or None)``."""
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
                if t not in SPLIT_NAMES:
                    raise ValueError(f"{path}:{lineno}: unknown split tag {t!r}; expected base, novel or excluded")
                tag = SPLIT_NAMES[t]
            syn = plain_synonyms(line)
            if not syn:
                raise ValueError(f"{path}:{lineno}: no class name on this line: {raw!r}")
            classes.append(syn)
            tags.append(tag)
        if not classes:
            raise ValueError(f"{path}: no classes found")
        if all(t is None for t in tags):
            return classes, None
        if any(t is None for t in tags):
            missing = [i for i, t in enumerate(tags) if t is None][:5]
            raise ValueError(f"{path}: split tags must be on every line or none; classes {missing} have none")
        return classes, [int(t) for t in tags]  # type: ignore[arg-type]

    @classmethod
    def from_file(cls, path: str | Path, model: Any, **kwargs: Any) -> "Vocabulary":
        """Embed the classes of a text class list (see :meth:`read_class_file`)."""
        classes, split = cls.read_class_file(path)
        if split is not None:
            kwargs.setdefault("split", split)
        return cls.from_names(classes, model, **kwargs)

    @classmethod
    def resolve(cls, spec: str | Path, model: Any, **kwargs: Any) -> "Vocabulary":
        """A built-in name, a saved vocabulary file, or a text class list."""
        text = str(spec)
        if text in BUILTINS:
            return cls.from_builtin(text, model, **kwargs)
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"vocabulary {text!r} is neither a built-in ({', '.join(BUILTINS)}) nor a file")
        if _is_saved(path):
            return cls.load(path)
        return cls.from_file(path, model, **kwargs)

    # ------------------------------------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_prototypes(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[2])

    @property
    def indicator(self) -> torch.Tensor:
        """``[C]`` int64 base/novel indicator for the ensemble (all novel when there is no split)."""
        if self.split is None:
            return torch.full((len(self),), NOVEL, dtype=torch.long)
        return torch.as_tensor(self.split.astype(np.int64))

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"class {name!r} is not in this vocabulary of {len(self)} classes") from None

    def subset(self, indices: Iterable[int]) -> "Vocabulary":
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"class indices {bad[:5]} out of range for {len(self)} classes")
        return Vocabulary(
            [self.names[i] for i in idx], [self.synonyms[i] for i in idx], self.embeddings[idx],
            split=None if self.split is None else self.split[idx], clip_model=self.clip_model,
            templates=self.templates,
        )

    def logits(self, region_embeddings: torch.Tensor, scale: float = 100.0, chunk_size: int = 4096) -> torch.Tensor:
        """``scale * max_p <normalize(f_n), t_{c,p}>`` for region embeddings ``[N, D]`` -> ``[N, C]``, in chunks of
        ``chunk_size`` classes."""
        f = F.normalize(torch.as_tensor(region_embeddings, dtype=torch.float32), dim=-1)
        parts = [torch.einsum("nd,cpd->ncp", f, self.embeddings[i : i + chunk_size]).max(dim=-1).values
                 for i in range(0, len(self), chunk_size)]
        return torch.cat(parts, dim=1) * scale

    def topk(self, region_embeddings: torch.Tensor, k: int, scale: float = 100.0,
             chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` ``(scores, class indices)`` ``[N, k]`` per region, merging per-chunk top-k so memory stays
        ``O(N * chunk_size)`` for any vocabulary size."""
        f = F.normalize(torch.as_tensor(region_embeddings, dtype=torch.float32), dim=-1)
        k = min(k, len(self))
        best_s = f.new_full((f.shape[0], 0), float("-inf"))
        best_i = torch.zeros((f.shape[0], 0), dtype=torch.long)
        for start in range(0, len(self), chunk_size):
            s = torch.einsum("nd,cpd->ncp", f, self.embeddings[start : start + chunk_size]).max(dim=-1).values * scale
            cs, ci = s.topk(min(k, s.shape[1]), dim=1)
            best_s = torch.cat([best_s, cs], dim=1)
            best_i = torch.cat([best_i, ci + start], dim=1)
            best_s, order = best_s.topk(min(k, best_s.shape[1]), dim=1)
            best_i = best_i.gather(1, order)
        return best_s, best_i

    # ------------------------------------------------------------------------------------------------ storage
    def _hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self._meta(), sort_keys=True).encode())
        h.update(self.embeddings.contiguous().numpy().tobytes())
        return h.hexdigest()

    def _meta(self) -> dict[str, Any]:
        return {
            "names": self.names, "synonyms": self.synonyms,
            "split": None if self.split is None else self.split.tolist(),
            "clip_model": self.clip_model, "templates": list(self.templates),
        }

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (embeddings + JSON metadata with the content hash), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": FILE_FORMAT, "meta": json.dumps(self._meta()), "content_hash": self.content_hash}
        tmp = path.with_name(path.name + ".tmp")
        save_file({"embeddings": self.embeddings.contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        """Load a file written by :meth:`save`; raises ``ValueError`` if it is not one or its hash does not match."""
        from safetensors import safe_open

        path = Path(path)
        if not _is_saved(path):
            raise ValueError(f"{path} is not a saved ovsam vocabulary")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            emb = f.get_tensor("embeddings")
        info = json.loads(meta["meta"])
        try:
            return cls(info["names"], info["synonyms"], emb,
                       split=None if info["split"] is None else np.asarray(info["split"], dtype=np.int8),
                       clip_model=info["clip_model"], templates=tuple(info["templates"]),
                       content_hash=meta["content_hash"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e


def encode_synonyms(
    model: Any, tokenizer: Any, synonyms: list[list[str]], templates: Sequence[str], *, batch_size: int = 64,
    progress: bool = True, device: str | torch.device | None = None,
) -> torch.Tensor:
    """``[C, P, D]`` unit-norm prototypes: template-averaged, normalised embeddings of every synonym, padded to
    P with each class's first synonym. Uses ``open_clip.build_zero_shot_classifier`` per chunk of synonyms."""
    from open_clip import build_zero_shot_classifier
    from tqdm.auto import tqdm

    if not templates:
        raise ValueError("at least one template is needed")
    text_model = model.text if hasattr(model, "clip_model_name") and hasattr(model, "text") else model
    if device is None:
        try:
            device = next(text_model.parameters()).device
        except StopIteration:
            device = "cpu"
    flat = [s for syn in synonyms for s in syn]
    was_training = text_model.training
    text_model.eval()
    chunks = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(flat), batch_size), disable=not progress, desc="text embeddings",
                              unit="chunk"):
                part = flat[start : start + batch_size]
                w = build_zero_shot_classifier(text_model, tokenizer, part, list(templates),
                                               num_classes_per_batch=None, device=device)
                chunks.append(w.T.float().cpu())
    finally:
        text_model.train(was_training)
    flat_emb = torch.cat(chunks)
    p = max(len(s) for s in synonyms)
    out = torch.empty(len(synonyms), p, flat_emb.shape[1])
    pos = 0
    for c, syn in enumerate(synonyms):
        n = len(syn)
        out[c, :n] = flat_emb[pos : pos + n]
        out[c, n:] = flat_emb[pos]
        pos += n
    return out


def _check_classes(names: list[str], synonyms: list[list[str]]) -> None:
    if not names:
        raise ValueError("a vocabulary needs at least one class")
    if len(names) != len(synonyms):
        raise ValueError(f"{len(names)} names but {len(synonyms)} synonym lists")
    seen: dict[str, int] = {}
    for i, (n, syn) in enumerate(zip(names, synonyms)):
        if not n.strip():
            raise ValueError(f"class {i} has an empty name")
        if not syn:
            raise ValueError(f"class {i} ({n!r}) has no synonyms")
        if n in seen:
            raise ValueError(f"duplicate class name {n!r} at indices {seen[n]} and {i}")
        seen[n] = i


def _check_split(split: Any, n: int) -> np.ndarray | None:
    if split is None:
        return None
    values = [SPLIT_NAMES[s] if isinstance(s, str) and s in SPLIT_NAMES else s for s in list(split)]
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"split must have one entry per class ({n}), got shape {arr.shape}")
    bad = [i for i, v in enumerate(arr.tolist()) if v not in (0, 1, 2)]
    if bad:
        raise ValueError(f"split values must be 1 (base), 2 (novel) or 0 (excluded); class {bad[0]} has "
                         f"{arr.tolist()[bad[0]]!r}")
    return arr.astype(np.int8)


def _load_json(name: str) -> dict:
    return json.loads((resources.files("ovsam") / "data" / name).read_text(encoding="utf-8"))


def _imagenet21k() -> tuple[list[str], list[list[str]]]:
    import timm

    info = Path(timm.__file__).parent / "data" / "_info"
    wnids = (info / "imagenet22k_synsets.txt").read_text().split()
    lemmas = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines()
                  if "\t" in line)
    synonyms = [plain_synonyms(lemmas[w]) for w in wnids]
    first = [s[0] for s in synonyms]
    counts: dict[str, int] = {}
    for f in first:
        counts[f] = counts.get(f, 0) + 1
    names = [f if counts[f] == 1 else f"{f} ({w})" for f, w in zip(first, wnids)]
    return names, synonyms


def _is_saved(path: Path) -> bool:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FILE_FORMAT
    except Exception:
        return False
