"""Vocabularies: class names + synonyms -> normalised CLIP text embeddings ``[C, P, D]`` (OVSAM_SPEC §3).

A vocabulary is data, not model state: it is built once with a CLIP text tower, saved to one safetensors file
with its names, synonyms, base/novel split, templates, CLIP model name and a content hash, and loaded by workers.

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

logger = logging.getLogger(__name__)

FILE_FORMAT = "ovsam-vocabulary"
FILE_VERSION = "1"
NORM_TOLERANCE = 1e-3
# ``ovsam pack`` writes these into classes.json (schemas/training.py, which this package must not import)
CLASSES_FORMAT_KEY = "format"
CLASSES_FORMAT = "ovsam-classes"


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
        _check_classes(names, synonyms)
        emb = _check_embeddings(self.embeddings, synonyms)
        split = _check_split(self.split, len(names))
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
        _check_classes(display, synonyms)
        if check_synonyms:
            warn_shared_synonyms(display, synonyms)
        _check_split(split, len(display))
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

    @classmethod
    def from_file(cls, path: str | Path, model: Any, **kwargs: Any) -> Vocabulary:
        """Embed the classes of a text class list (see :meth:`read_class_file`)."""
        classes, split = cls.read_class_file(path)
        if split is not None:
            kwargs.setdefault("split", split)
        return cls.from_names(classes, model, **kwargs)

    @staticmethod
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

    @classmethod
    def read_spec(cls, spec: str | Path) -> tuple[list[str], list[list[str]], list[int] | None]:
        """``(display names, synonyms, split)`` of anything :meth:`resolve` takes, without a model and without
        embedding anything (a saved vocabulary is loaded as it is)."""
        text = str(spec)
        if text in BUILTINS:
            names, synonyms, split = cls.class_list(text)
        else:
            path = Path(text)
            if not path.is_file():
                raise ValueError(f"vocabulary {text!r} is neither a built-in ({', '.join(BUILTINS)}) nor a file")
            if _is_saved(path):
                v = cls.load(path)
                names, synonyms, split = v.names, v.synonyms, v.split
            elif _is_classes_json(path):
                names, synonyms, split = cls.read_classes_json(path)
            else:
                synonyms, split = cls.read_class_file(path)
                names = [s[0] for s in synonyms]
        return list(names), [list(s) for s in synonyms], None if split is None else [int(v) for v in split]

    @classmethod
    def resolve(cls, spec: str | Path, model: Any, **kwargs: Any) -> Vocabulary:
        """A built-in name, a file written by :meth:`save` (``model`` unused), a packed dataset's
        ``classes.json`` (:meth:`read_classes_json`), or a text class list."""
        text = str(spec)
        if text in BUILTINS:
            return cls.from_builtin(text, model, **kwargs)
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"vocabulary {text!r} is neither a built-in ({', '.join(BUILTINS)}) nor a file")
        if _is_saved(path):
            return cls.load(path)
        if _is_classes_json(path):
            names, synonyms, split = cls.read_classes_json(path)
            if split is not None:
                kwargs.setdefault("split", split)
            return cls.from_names(synonyms, model, display_names=names, check_synonyms=False, **kwargs)
        return cls.from_file(path, model, **kwargs)

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
        """Write one safetensors file (``embeddings`` + JSON metadata with the content hash), atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": FILE_FORMAT, "version": FILE_VERSION, "meta": json.dumps(self._meta()),
                "content_hash": self.content_hash}
        tmp = path.with_name(path.name + ".tmp")
        save_file({"embeddings": self.embeddings.detach().cpu().contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)
        logger.info("saved vocabulary of %d classes to %s (hash %s)", len(self), path, self.content_hash[:12])
        return path

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Load a file written by :meth:`save`. Raises ``ValueError`` naming the file if it is not one, or if its
        content does not match its stored hash."""
        from safetensors import safe_open

        path = Path(path)
        if not _is_saved(path):
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
            return cls(info["names"], info["synonyms"], emb, split=split, clip_model=info["clip_model"],
                       templates=tuple(info["templates"]), content_hash=meta.get("content_hash", "missing"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: {type(e).__name__}: {e}") from e


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


def _check_classes(names: list[str], synonyms: list[list[str]]) -> None:
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


def _check_split(split: Any, n: int) -> np.ndarray | None:
    if split is None:
        return None
    values = [SPLIT_NAMES.get(s, s) if isinstance(s, str) else s for s in list(split)]
    if len(values) != n:
        raise ValueError(f"split must have one entry per class ({n}), got {len(values)}")
    for i, v in enumerate(values):
        if isinstance(v, str) or v not in (0, 1, 2):
            raise ValueError(f"split values must be 1/'base', 2/'novel' or 0/'excluded'; class {i} has {v!r}")
    return np.asarray(values, dtype=np.int8)


def _is_classes_json(path: Path) -> bool:
    """Whether ``path`` holds a JSON object (then it must be a packed dataset's ``classes.json``; text class lists
    never start with ``{``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    return head.lstrip().startswith(b"{")


def _is_saved(path: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FILE_FORMAT
    except (SafetensorError, OSError, UnicodeDecodeError):
        return False
