"""Vocabularies: class names + synonyms -> normalised CLIP text embeddings ``[C, P, D]`` (OVSAM_SPEC §3).

A vocabulary is data, not model state: it is built once with a CLIP text tower, saved to one safetensors file
with its names, synonyms, base/novel split, templates, CLIP model name and a content hash, and loaded by workers.
This module builds vocabularies (:meth:`Vocabulary.from_names`, :func:`encode_synonyms`) and scores regions
against them (:meth:`Vocabulary.logits`, :meth:`Vocabulary.topk`, :meth:`Vocabulary.prototypes`); the class-list
and vocabulary file formats, and the checks on names, synonyms and split, are in :mod:`ovsam.vocabulary_files`.

Text normalisation is explicit. ``Vocabulary.from_names(..., normalize="plain")`` (the default, for user class
lists) splits string entries on commas and strips each synonym; ``normalize="ovsam"`` applies the published
``split_label`` rule (:func:`split_label`). Built-in class lists (:meth:`Vocabulary.class_list`) are already
normalised as the published embeddings were.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .class_lists import (BASE, BUILTINS, EXCLUDED, NOVEL, SPLIT_NAMES, builtin_class_list,  # noqa: F401
                          plain_synonyms, split_label)
from .modeling.recognition import ClassPrototypes
from .templates import VILD_TEMPLATES
from .vocabulary_files import (CLASSES_FORMAT, CLASSES_FORMAT_KEY, FILE_FORMAT, FILE_VERSION,  # noqa: F401
                               check_classes, check_split, read_class_file, read_classes_json, read_saved, spec_kind,
                               write_saved)

logger = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3


_NORMALIZERS = {"plain": plain_synonyms, "ovsam": split_label}


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """C classes, each with P synonym prototypes of dimension D. Two vocabularies are equal iff their content
    hashes are.

    Attributes:
      names: display name per class, unique and non-empty.
      synonyms: the texts embedded per class, at least one each; the first one pads short classes.
      embeddings: ``[C, P, D]`` float32, every row unit-norm, ``P >= max(len(s) for s in synonyms)``; classes
        with fewer than P synonyms repeat their first synonym's vector.
      split: ``[C]`` int8 in {1 base, 2 novel, 0 excluded}, or None for no split (every class is then scored as
        novel, as the published model does when no split is set). Accepts the strings "base"/"novel"/"excluded".
      clip_model: name of the CLIP model whose text tower made the embeddings.
      templates: prompt templates averaged per synonym.
      content_hash: sha256 hex of all of the above (and the embeddings' shape and bytes), computed on
        construction; passing a value makes construction fail if it differs from the computed one, so
        ``dataclasses.replace`` needs ``content_hash=""`` when it changes content.
    """

    names: list[str]
    synonyms: list[list[str]]
    embeddings: torch.Tensor
    split: np.ndarray | None = None
    clip_model: str = ""
    templates: tuple[str, ...] = VILD_TEMPLATES
    content_hash: str = field(default="")

    def __post_init__(self) -> None:
        names = [str(n) for n in self.names]
        synonyms = [[str(s) for s in syn] for syn in self.synonyms]
        check_classes(names, synonyms)
        emb = _check_embeddings(self.embeddings, synonyms)
        split = check_split(self.split, len(names))
        for key, value in (("names", names), ("synonyms", synonyms), ("embeddings", emb), ("split", split),
                           ("clip_model", str(self.clip_model)), ("templates", tuple(self.templates))):
            object.__setattr__(self, key, value)
        computed = self._hash()
        if self.content_hash and self.content_hash != computed:
            raise ValueError(f"vocabulary content hash mismatch: stored {self.content_hash}, computed {computed}")
        object.__setattr__(self, "content_hash", computed)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other.content_hash == self.content_hash

    def __hash__(self) -> int:
        return hash(self.content_hash)

    def __repr__(self) -> str:
        shown = ", ".join(repr(n) for n in self.names[:3]) + (", ..." if len(self) > 3 else "")
        split = "none" if self.split is None else "/".join(str(int((self.split == v).sum())) for v in (1, 2, 0))
        return (f"Vocabulary({len(self)} classes [{shown}], P={self.num_prototypes}, D={self.dim}, "
                f"clip_model={self.clip_model!r}, split base/novel/excluded={split}, hash={self.content_hash[:12]})")

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
        check_synonyms: bool = True,
    ) -> Vocabulary:
        """Embed class names with a CLIP text tower (OVSAM_SPEC §3.1).

        Arguments:
          names: one entry per class: a string of comma-separated synonyms (``"couch,sofa"``) or a list of
            synonyms.
          model: anything with ``encode_text(tokens [N, L], normalize: bool) -> [N, D]``, a ``tokenizer``
            (``list[str] -> LongTensor [N, L]``) and a ``clip_model_name`` (an ``OvsamModel`` has all three); or
            an open_clip ``CLIP`` together with ``tokenizer=`` and ``clip_model=``.
          split: per class ``1``/``"base"``, ``2``/``"novel"``, ``0``/``"excluded"``; None = no split.
          normalize: ``"plain"`` (split string entries on commas, strip) or ``"ovsam"`` (the published
            :func:`split_label`, applied to string entries and to every element of list entries).
          display_names: class names to show; default: each class's first synonym.
          batch_size: synonyms encoded per forward pass (each with every template, so ``batch_size *
            len(templates)`` prompts); one progress-bar step.
          device: where the tokens are sent; default: the device of the model's parameters. The model is not
            moved.
          check_synonyms: warn about synonyms that several classes share (:func:`warn_shared_synonyms`).

        Each synonym is embedded with every template, each prompt embedding L2-normalised, averaged over the
        templates and L2-normalised again (``open_clip.build_zero_shot_classifier``); classes are padded to P
        with their first synonym. Runs under ``torch.no_grad()`` with the model in eval mode; every submodule's
        train/eval mode is restored afterwards.
        """
        if normalize not in _NORMALIZERS:
            raise ValueError(f"normalize must be one of {', '.join(_NORMALIZERS)}; got {normalize!r}")
        norm = _NORMALIZERS[normalize]
        if isinstance(names, str):
            raise TypeError(f"names must be a list of class entries, got the single string {names!r}")
        synonyms: list[list[str]] = []
        for i, entry in enumerate(names):
            if isinstance(entry, str):
                syn = norm(entry)
            elif normalize == "ovsam":
                syn = [s for part in entry for s in split_label(str(part))]
            else:
                syn = [str(s).strip() for s in entry if str(s).strip()]
            if not syn:
                raise ValueError(f"class {i} ({entry!r}) has no synonyms after {normalize!r} normalisation")
            synonyms.append(syn)
        display = [str(n) for n in display_names] if display_names is not None else [s[0] for s in synonyms]
        tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        clip_name = clip_model if clip_model is not None else getattr(model, "clip_model_name", None)
        if tok is None or clip_name is None or not hasattr(model, "encode_text"):
            raise TypeError(f"from_names needs a model with encode_text, tokenizer and clip_model_name (e.g. an "
                            f"OvsamModel), or an open_clip CLIP with tokenizer= and clip_model=; got "
                            f"{type(model).__name__} with tokenizer={tok is not None}, clip_model={clip_name!r}")
        check_classes(display, synonyms)
        if check_synonyms:
            warn_shared_synonyms(display, synonyms)
        check_split(split, len(display))
        emb = encode_synonyms(model, tok, synonyms, templates, batch_size=batch_size, progress=progress,
                              device=device)
        return cls(display, synonyms, emb, split=split, clip_model=clip_name, templates=tuple(templates))

    @classmethod
    def builtin_names(cls) -> list[str]:
        """Names accepted by :meth:`class_list` and :meth:`from_builtin`."""
        return list(BUILTINS)

    @classmethod
    def class_list(cls, name: str) -> tuple[list[str], list[list[str]], np.ndarray | None]:
        """``(display names, synonyms, split)`` of a built-in vocabulary, without any model.

        ``coco``: 80 classes in the standard order with their published synonym lists (173 synonyms, P = 17);
        split 48 base / 17 novel / 15 excluded. ``lvis``: 1203 classes named by their LVIS name, with
        ``split_label(name)`` as synonyms as published (only ``tape_(sticky_cloth_or_paper)`` splits, so P = 2);
        866 base / 337 novel. ``imagenet21k``: timm's 21,841 ImageNet-21k synsets with their WordNet lemmas as
        synonyms; display names are the first lemma, with the WordNet id appended where that is ambiguous; no split.
        """
        return builtin_class_list(name)

    @classmethod
    def from_builtin(cls, name: str, model: Any, **kwargs: Any) -> Vocabulary:
        """Embed a built-in class list (see :meth:`class_list`) with ``model``; ``kwargs`` go to
        :meth:`from_names` (``split`` defaults to the built-in split)."""
        names, synonyms, split = cls.class_list(name)
        kwargs.setdefault("split", split)
        return cls.from_names(synonyms, model, display_names=names, check_synonyms=False, **kwargs)

    @staticmethod
    def read_class_file(path: str | Path) -> tuple[list[list[str]], list[int] | None]:
        """Read a UTF-8 text class list: ``(synonyms per class, split or None)``, one class per line with
        comma-separated synonyms and an optional ``| base``/``| novel``/``| excluded`` tag
        (:func:`ovsam.vocabulary_files.read_class_file`)."""
        return read_class_file(path)

    @classmethod
    def from_file(cls, path: str | Path, model: Any, **kwargs: Any) -> Vocabulary:
        """Embed the classes of a text class list (see :meth:`read_class_file`)."""
        classes, split = cls.read_class_file(path)
        if split is not None:
            kwargs.setdefault("split", split)
        return cls.from_names(classes, model, **kwargs)

    @staticmethod
    def read_classes_json(path: str | Path) -> tuple[list[str], list[list[str]], list[int] | None]:
        """Read the ``classes.json`` of a packed training dataset (``ovsam pack``): ``(display names, synonyms per
        class, split or None)`` (:func:`ovsam.vocabulary_files.read_classes_json`)."""
        return read_classes_json(path)

    @classmethod
    def read_spec(cls, spec: str | Path) -> tuple[list[str], list[list[str]], list[int] | None]:
        """``(display names, synonyms, split)`` of anything :meth:`resolve` takes, without a model and without
        embedding anything (a saved vocabulary is loaded as it is)."""
        kind, source = spec_kind(spec)
        if kind == "builtin":
            names, synonyms, split = cls.class_list(str(source))
        elif kind == "saved":
            v = cls.load(source)
            names, synonyms, split = v.names, v.synonyms, v.split
        elif kind == "classes_json":
            names, synonyms, split = cls.read_classes_json(source)
        else:
            synonyms, split = cls.read_class_file(source)
            names = [s[0] for s in synonyms]
        return list(names), [list(s) for s in synonyms], None if split is None else [int(v) for v in split]

    @classmethod
    def resolve(cls, spec: str | Path, model: Any, **kwargs: Any) -> Vocabulary:
        """A built-in name, a file written by :meth:`save` (``model`` unused), a packed dataset's
        ``classes.json`` (:meth:`read_classes_json`), or a text class list."""
        kind, source = spec_kind(spec)
        if kind == "builtin":
            return cls.from_builtin(str(source), model, **kwargs)
        if kind == "saved":
            return cls.load(source)
        if kind == "classes_json":
            names, synonyms, split = cls.read_classes_json(source)
            if split is not None:
                kwargs.setdefault("split", split)
            return cls.from_names(synonyms, model, display_names=names, check_synonyms=False, **kwargs)
        return cls.from_file(source, model, **kwargs)

    # ------------------------------------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_prototypes(self) -> int:
        """P."""
        return int(self.embeddings.shape[1])

    @property
    def dim(self) -> int:
        """D."""
        return int(self.embeddings.shape[2])

    @property
    def indicator(self) -> torch.Tensor:
        """``[C]`` int64 base(1)/novel(2)/excluded(0) indicator for the ensemble; all 2 when there is no split."""
        if self.split is None:
            return torch.full((len(self),), NOVEL, dtype=torch.long)
        return torch.from_numpy(self.split.astype(np.int64))

    def index(self, name: str) -> int:
        """Index of the class whose display name is ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"class {name!r} is not in this vocabulary of {len(self)} classes") from None

    def subset(self, indices: Iterable[int]) -> Vocabulary:
        """The classes at ``indices`` (in that order), keeping P, templates and CLIP model."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"class indices {bad[:5]} out of range for {len(self)} classes")
        return Vocabulary(
            [self.names[i] for i in idx], [self.synonyms[i] for i in idx], self.embeddings[idx],
            split=None if self.split is None else self.split[idx], clip_model=self.clip_model,
            templates=self.templates,
        )

    def prototypes(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> ClassPrototypes:
        """The embeddings without their padding (:class:`~ovsam.modeling.recognition.ClassPrototypes`) on
        ``device`` in ``dtype``: what the prediction functions classify against. Made once per device and dtype."""
        cache = self.__dict__.setdefault("_prototypes", {})
        key = (str(torch.device(device)), dtype)
        if key not in cache:
            if "base" not in cache:
                cache["base"] = ClassPrototypes.from_padded(self.embeddings.detach().float().cpu())
            cache[key] = cache["base"].to(device, dtype)
        return cache[key]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_prototypes"}

    def to(self, device: str | torch.device) -> Vocabulary:
        """The same vocabulary with its embeddings on ``device`` (same content hash)."""
        return Vocabulary(self.names, self.synonyms, self.embeddings.to(device), split=self.split,
                          clip_model=self.clip_model, templates=self.templates, content_hash=self.content_hash)

    def logits(self, region_embeddings: torch.Tensor, scale: float = 100.0, chunk_size: int = 4096) -> torch.Tensor:
        """``scale * max_p <normalize(f_n), t_{c,p}>``: region embeddings ``[N, D]`` -> float32 ``[N, C]``.

        Computed on the regions' device in chunks of ``chunk_size`` classes, one prototype at a time, so the
        working memory is ``O(N * chunk_size)`` besides the ``[N, C]`` result.
        """
        f = self._regions(region_embeddings)
        parts = [self._chunk_scores(f, start, chunk_size) for start in range(0, len(self), chunk_size)]
        return torch.cat(parts, dim=1) * scale

    def topk(self, region_embeddings: torch.Tensor, k: int, scale: float = 100.0,
             chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` ``(scores [N, k] float32, class indices [N, k] int64)`` of :meth:`logits`, best first;
        ``k`` is capped at C. Per-chunk top-k are merged, so memory is ``O(N * (chunk_size + k))`` for any C."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        f = self._regions(region_embeddings)
        k = min(int(k), len(self))
        best_s = f.new_empty((f.shape[0], 0))
        best_i = torch.empty((f.shape[0], 0), dtype=torch.long, device=f.device)
        for start in range(0, len(self), chunk_size):
            s = self._chunk_scores(f, start, chunk_size) * scale
            cs, ci = s.topk(min(k, s.shape[1]), dim=1)
            best_s, order = torch.cat([best_s, cs], dim=1).topk(min(k, best_s.shape[1] + cs.shape[1]), dim=1)
            best_i = torch.cat([best_i, ci + start], dim=1).gather(1, order)
        return best_s, best_i

    def _regions(self, region_embeddings: torch.Tensor) -> torch.Tensor:
        f = torch.as_tensor(region_embeddings)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"region embeddings must be [N, D={self.dim}], got {tuple(f.shape)}")
        return F.normalize(f.float(), dim=-1)

    def _chunk_scores(self, f: torch.Tensor, start: int, chunk_size: int) -> torch.Tensor:
        text = self.embeddings[start : start + chunk_size].to(f.device)
        scores = f @ text[:, 0].T
        for p in range(1, text.shape[1]):
            scores = torch.maximum(scores, f @ text[:, p].T)
        return scores

    # ------------------------------------------------------------------------------------------------ storage
    def _meta(self) -> dict[str, Any]:
        return {
            "names": self.names, "synonyms": self.synonyms,
            "split": None if self.split is None else self.split.tolist(),
            "clip_model": self.clip_model, "templates": list(self.templates),
        }

    def _hash(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({**self._meta(), "shape": list(self.embeddings.shape)}, sort_keys=True).encode())
        h.update(self.embeddings.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (``embeddings`` + JSON metadata with the content hash), atomically
        (:func:`ovsam.vocabulary_files.write_saved`)."""
        path = write_saved(path, self.embeddings, self._meta(), self.content_hash)
        logger.info("saved vocabulary of %d classes to %s (hash %s)", len(self), path, self.content_hash[:12])
        return path

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Load a file written by :meth:`save`. Raises ``ValueError`` naming the file if it is not one, or if its
        content does not match its stored hash."""
        fields = read_saved(path)
        try:
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{Path(path)}: {type(e).__name__}: {e}") from e


def encode_synonyms(
    model: Any, tokenizer: Any, synonyms: list[list[str]], templates: Sequence[str], *, batch_size: int = 64,
    progress: bool = True, device: str | torch.device | None = None,
) -> torch.Tensor:
    """``[C, P, D]`` float32 unit-norm prototypes on CPU: the template-averaged, normalised embedding of every
    synonym (``open_clip.build_zero_shot_classifier`` over chunks of ``batch_size`` synonyms), grouped per class
    and padded to P with each class's first synonym."""
    from open_clip import build_zero_shot_classifier
    from tqdm.auto import tqdm

    if not templates:
        raise ValueError("at least one template is needed")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' placeholder; these have none: {bad}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        params = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
        device = next(params, torch.empty(0)).device
    flat = [s for syn in synonyms for s in syn]
    logger.info("embedding %d synonyms of %d classes x %d templates", len(flat), len(synonyms), len(templates))
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, torch.nn.Module) else []
    if isinstance(model, torch.nn.Module):
        model.eval()
    chunks = []
    try:
        with torch.no_grad(), tqdm(total=len(flat), disable=not progress, desc="text embeddings",
                                   unit="synonym") as bar:
            for start in range(0, len(flat), batch_size):
                part = flat[start : start + batch_size]
                w = build_zero_shot_classifier(model, tokenizer, part, list(templates), num_classes_per_batch=None,
                                               device=device)
                chunks.append(w.T.float().cpu())
                bar.update(len(part))
    finally:
        for m, mode in modes:
            m.training = mode
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


def warn_shared_synonyms(names: list[str], synonyms: list[list[str]]) -> None:
    """Log a warning for each synonym (case-insensitive) that more than one class of a user's list has: those
    classes then compete for the same regions. (WordNet-based built-ins share thousands by design.)"""
    owner: dict[str, int] = {}
    shared = []
    for i, syn in enumerate(synonyms):
        for s in dict.fromkeys(x.strip().lower() for x in syn):
            if s in owner and owner[s] != i:
                shared.append(f"{s!r} (classes {owner[s]} {names[owner[s]]!r} and {i} {names[i]!r})")
            owner.setdefault(s, i)
    if shared:
        logger.warning("%d synonym(s) belong to more than one class, so those classes compete for the same regions: "
                       "%s", len(shared), "; ".join(shared[:10]) + (" ..." if len(shared) > 10 else ""))


def _check_embeddings(embeddings: Any, synonyms: list[list[str]]) -> torch.Tensor:
    emb = torch.as_tensor(embeddings).detach()
    c, p = len(synonyms), max(len(s) for s in synonyms)
    if emb.ndim != 3 or emb.shape[0] != c or emb.shape[1] < p:
        raise ValueError(f"embeddings must have shape [C={c}, P>={p}, D], got {tuple(emb.shape)}")
    emb = emb.to(torch.float32)
    norms = emb.norm(dim=-1)
    off = ~((norms - 1).abs() <= NORM_TOLERANCE)
    if off.any():
        ci, pi = (int(v) for v in off.nonzero()[0])
        raise ValueError(f"embeddings must be unit-norm rows; class {ci} prototype {pi} has norm "
                         f"{float(norms[ci, pi]):.6g} ({int(off.sum())} rows off by more than {NORM_TOLERANCE})")
    return emb
