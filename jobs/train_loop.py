"""The per-worker loop of ``ovsam train`` (``train_loop(config)``), run by ``jobs.trainer.launch`` on every Ray
Train worker, or in one process by ``jobs.trainer.run_local``.

It reads top to bottom: build the model and freeze all but the FPN and the mask decoder (with its label token and
``roi_conv``; ``--unfreeze`` adds the CLIP trunk and/or the neck), load or build each dataset's vocabulary, restore
the newest checkpoint, then per step: the mixture picks a dataset (the same on every rank), a batch of that dataset
only, CLIP2SAM losses, gradients averaged over workers, clip, AdamW and scheduler step, metrics; every
``checkpoint_every`` steps a checkpoint (``state.pt`` + ``model.safetensors``), every ``eval_every`` steps and at the
end the held-out evaluation. Rank 0 sends the driver progress lines (``jobs.progress.ProgressMeter``): the run's
shape once the workers are ready, a step line at least every ``progress_every`` seconds (through the trunk warm-up
too), and each held-out evaluation as it starts and with its result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from jobs import trainer
from jobs.progress import ProgressMeter
from jobs.train_config import MODEL_FILE, STAGE, TrainJobConfig
from pipeline.training import train_data as TD

logger = logging.getLogger(__name__)

VOCAB_CACHE_DIR = "_vocab"


# ------------------------------------------------------------------------------------------------ vocabularies


def _text_tower_digest(model: Any) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.text.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def vocabulary_for(classes: Any, model: Any, cache_root: str, storage_options: dict | None = None,
                   tower_digest: str | None = None, templates: tuple[str, ...] | None = None) -> Any:
    """The dataset's :class:`ovsam.Vocabulary`, from the cache under ``cache_root`` or built (rank 0) and cached.

    Classes without a base/novel split count as base: the model is trained on them, so the ensemble gives the
    trained classifier its base-class weight. The cache key covers the classes, the split, the templates, the CLIP
    model and the text tower's weights. Every rank must call this (rank 0 builds, the others wait and load)."""
    import fsspec

    from ovsam import Vocabulary
    from ovsam.class_lists import SPLIT_NAMES
    from ovsam.templates import VILD_TEMPLATES

    split = [SPLIT_NAMES[s] for s in classes.split] if classes.split is not None else [1] * len(classes.classes)
    digest = tower_digest or _text_tower_digest(model)
    templates = tuple(templates or VILD_TEMPLATES)
    key = hashlib.sha256(json.dumps({"classes": classes.classes, "split": split, "clip": model.clip_model_name,
                                     "tower": digest, "templates": templates}).encode()).hexdigest()[:32]
    url = posixpath.join(cache_root.rstrip("/"), VOCAB_CACHE_DIR, f"{key}.safetensors")
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    rank, _ = trainer.world()
    if rank == 0 and not fs.exists(path):
        names_file = {"format": "ovsam-classes", "version": 1, "dataset": classes.dataset, "kind": classes.kind,
                      "classes": classes.classes, "split": classes.split, "ids": classes.ids}
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "classes.json"
            src.write_text(json.dumps(names_file))
            vocab = Vocabulary.resolve(src, model, split=split, templates=templates, progress=False)
            saved = vocab.save(Path(tmp) / "vocab.safetensors")
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            fs.put_file(str(saved), path + f".tmp{os.getpid()}")
            fs.mv(path + f".tmp{os.getpid()}", path)
        logger.info("built the vocabulary of %s (%d classes) and cached it at %s", classes.dataset,
                    len(classes.classes), url)
    trainer.barrier()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "vocab.safetensors"
        fs.get_file(path, str(local))
        return Vocabulary.load(local)


# ------------------------------------------------------------------------------------------------ evaluation


def _metric_keys(kind: str, has_split: bool) -> list[str]:
    prefixes = ["", "base_", "novel_"] if has_split else [""]
    fields = ["count", "correct", "head_correct", "gt_box_correct"] + (["iou", "masks"] if kind == "mask" else [])
    return [p + f for p in prefixes for f in fields]


@contextmanager
def _in_eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Every module and its children in eval mode inside the block, each child's train mode restored after it."""
    was_training = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, mode in was_training:
            m.train(mode)


def evaluate_heldout(model: Any, heldout: list[tuple[str, TD.ShardSet, Any]], cfg: TrainJobConfig,
                     prefix: str) -> dict[str, float]:
    """The §5 metric on each held-out set, samples split over the ranks; ``{prefix}<name>/<prompt>/<metric>``.
    Every rank must call it."""
    from ovsam.evaluation import InstanceMetric, evaluate_samples

    rank, world = trainer.world()
    out: dict[str, float] = {}
    with _in_eval_mode(model):
        for name, shard_set, vocab in heldout:
            kind = shard_set.classes.kind
            prompts = ("box", "point") if kind == "mask" else ("box",)
            for prompt in prompts:
                def mine():
                    for i, (key, image, record) in enumerate(TD.iter_samples(list(shard_set.shards),
                                                                             shard_set.storage_options,
                                                                             rank=rank, world=world,
                                                                             limit=cfg.eval_samples)):
                        yield image, TD.eval_targets(record)

                metric = evaluate_samples(model, mine(), vocab, prompt=prompt, batch_size=cfg.eval_batch_size)
                sums = {k: metric.sums.get(k, 0.0) for k in _metric_keys(kind, vocab.split is not None)}
                total = {k: v * world for k, v in trainer.all_reduce_mean(sums).items()}
                for k, v in InstanceMetric.summary(total).items():
                    out[f"{prefix}{name}/{prompt}/{k}"] = v
    return out


def evaluate_probe(model: Any, probe: Any, heldout: list[tuple[str, TD.ShardSet, Any]], cfg: TrainJobConfig,
                   aug: TD.AugmentConfig, prefix: str) -> dict[str, float]:
    """Top-1 of the trunk warm-up's probe on every GT box of the held-out sets it has a classifier for
    (``{prefix}<name>/probe_acc``), samples split over the ranks. Every rank must call it."""
    from ovsam.clip2sam import trunk_warmup_losses

    rank, world = trainer.world()
    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    with _in_eval_mode(model, probe):
        for name, shard_set, _ in heldout:
            if name not in probe.datasets:
                continue
            sums = {"correct": 0.0, "labelled": 0.0}
            batch: list = []

            def score(batch: list) -> None:
                with torch.no_grad():
                    _, stats = trunk_warmup_losses(model, probe, batch)
                sums["correct"] += stats["correct"]
                sums["labelled"] += stats["labelled"]

            for key, image, record in TD.iter_samples(list(shard_set.shards), shard_set.storage_options, rank=rank,
                                                      world=world, limit=cfg.eval_samples):
                count = len(record.labels if record.kind != "image" else record.image_labels)
                if count == 0:
                    continue  # every instance once: as many prompts as instances, no augmentation, none dropped
                one = dataclasses.replace(aug, augment=False, min_area=0.0, num_prompts=count)
                sample = TD.prepare_sample(image, record, one, rng, dataset=name, key=key)
                if sample is not None:
                    batch.append(sample)
                if len(batch) == cfg.eval_batch_size:
                    score(batch)
                    batch = []
            if batch:
                score(batch)
            total = trainer.all_reduce_mean(sums)
            out[f"{prefix}{name}/probe_acc"] = total["correct"] / max(total["labelled"], 1e-9)
    return out


def heldout_line(metrics: dict[str, float], prefix: str) -> str:
    """``synthetic/box mIoU 0.812 top-1 0.790; synthetic/point ...`` from :func:`evaluate_heldout`'s metrics, or
    ``synthetic probe top-1 0.780`` from :func:`evaluate_probe`'s."""
    parts = []
    for key in sorted(k for k in metrics if k.startswith(prefix) and k.endswith(("/acc", "/probe_acc"))):
        where = key[len(prefix):].rsplit("/", 1)[0]
        if key.endswith("/probe_acc"):
            parts.append(f"{where} probe top-1 {metrics[key]:.3f}")
            continue
        miou = metrics.get(f"{prefix}{where}/miou")
        parts.append(f"{where}" + (f" mIoU {miou:.3f}" if miou is not None else "") + f" top-1 {metrics[key]:.3f}")
    return "; ".join(parts) or "no instances"


def _evaluate(meter: ProgressMeter, what: str, evaluate: Any, prefix: str) -> dict[str, float]:
    """``evaluate()`` (every rank), with a progress line as it starts and one with its result and duration."""
    meter.note(f"{what}: evaluating the held-out set(s)...")
    with meter.aside() as timer:
        out = evaluate()
    meter.note(f"{what}: {heldout_line(out, prefix)} ({timer['seconds']:.0f} s)")
    return out


# ------------------------------------------------------------------------------------------------ the loop


def _optim_config(cfg: TrainJobConfig):
    """The published CLIP2SAM settings with the run's lr, decay, clip, schedule and a warm-up scaled to the run."""
    from ovsam.training import published_optim

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(500, max(1, round(0.05 * cfg.steps)))
    return dataclasses.replace(published_optim(STAGE), lr=cfg.learning_rate(), weight_decay=cfg.weight_decay,
                               clip_grad_norm=cfg.clip_grad_norm, warmup_steps=warmup, schedule=cfg.schedule)


def adapt_model_config(model: Any, cfg: TrainJobConfig) -> None:
    """The trained model's recognition settings: ``--roi-box``, and no frozen-CLIP ensemble once the CLIP trunk
    trains (its features drift away from the text tower's, so the CLIP branch would score noise)."""
    rec = model.config.recognition
    changes: dict[str, Any] = {}
    if cfg.roi_box is not None and cfg.roi_box != rec.roi_box:
        changes["roi_box"] = cfg.roi_box
    if cfg.trains_trunk() and rec.ensemble:
        changes["ensemble"] = False
        logger.info("the CLIP trunk trains: the trained model classifies with the head alone (no CLIP ensemble)")
    if changes:
        model.config = dataclasses.replace(model.config, recognition=dataclasses.replace(rec, **changes))


def _trained_parts(cfg: TrainJobConfig) -> tuple[str, ...]:
    """The ``--unfreeze`` names of every part the run changes: ``cfg.unfreeze``, plus the trunk a warm-up trains."""
    return cfg.unfreeze + (("clip",) if cfg.trunk_warmup and "clip" not in cfg.unfreeze else ())


def _trainable_state(model: Any, unfreeze: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from ovsam.training import trainable_modules

    prefixes = tuple(f"{m}." for m in trainable_modules(STAGE, unfreeze))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def train_loop(config: dict) -> None:
    """Train one worker's share of a CLIP2SAM run described by ``TrainJobConfig.to_dict()``."""
    from ovsam import build_ovsam
    from ovsam.checkpoint import save_checkpoint
    from ovsam.clip2sam import LossConfig, RegionProbe, clip2sam_losses, trunk_warmup_losses
    from ovsam.training import (MixedPrecision, build_optimizer, build_scheduler, clip_gradients, set_trainable,
                                train_mode)

    started = time.monotonic()
    cfg = TrainJobConfig.from_dict(config)
    rank, world = trainer.world()
    trainer.progress(f"[train] {world} worker(s) started: building {cfg.model}, the vocabularies and the data "
                     f"streams")
    model = build_ovsam(cfg.model, checkpoint=cfg.checkpoint)
    if not hasattr(model, "fpn_neck"):
        raise ValueError(f"model {cfg.model!r} is not an OV-SAM model; CLIP2SAM training needs an ovsam-* model")
    adapt_model_config(model, cfg)
    mp = MixedPrecision(cfg.precision, model.device)
    params = set_trainable(model, STAGE, cfg.unfreeze)
    optim_cfg = _optim_config(cfg)
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, cfg.steps, optim_cfg)
    loss_cfg = LossConfig(mask_points=cfg.mask_points)
    image_size = model.image_size
    min_area = cfg.min_area if cfg.min_area is not None else 32.0 * (image_size / 1024) ** 2
    aug = TD.AugmentConfig(image_size=image_size, scale_range=cfg.scale_range, min_area=min_area,
                           num_prompts=cfg.num_prompts, published_truncation=cfg.published_truncation,
                           published_image_box=cfg.published_image_box)

    shard_sets = {d.name: TD.open_shard_set(d.url, cfg.storage_options) for d in cfg.datasets}
    digest = _text_tower_digest(model)
    texts: dict[str, torch.Tensor | None] = {}
    for d in cfg.datasets:
        classes = shard_sets[d.name].classes
        if classes is None:
            raise ValueError(f"dataset {d.name!r} ({d.url}) has no classes.json; pack it with `ovsam pack`")
        if classes.kind != d.kind:
            logger.warning("dataset %s is packed as %r but trained as %r", d.name, classes.kind, d.kind)
        texts[d.name] = None if classes.class_agnostic else \
            vocabulary_for(classes, model, cfg.storage_path, cfg.storage_options, digest,
                           cfg.template_list()).embeddings
    heldout = []
    for name, url in cfg.heldout:
        shard_set = TD.open_shard_set(url, cfg.storage_options)
        classes = shard_set.classes or (shard_sets[name].classes if name in shard_sets else None)
        if classes is None or classes.class_agnostic:
            raise ValueError(f"held-out set {name!r} ({url}) needs a classes.json with classes (or a training "
                             f"dataset of the same name)")
        shard_set = TD.ShardSet(shard_set.url, shard_set.shards, classes, shard_set.num_samples,
                                shard_set.storage_options)
        heldout.append((name, shard_set, vocabulary_for(classes, model, cfg.storage_path, cfg.storage_options,
                                                        digest, cfg.template_list())))

    # The trunk warm-up (steps [0, trunk_warmup)): the trunk and a RegionProbe, with their own optimiser and
    # schedule; the CLIP2SAM steps follow with the optimiser built above (scheduler step = step - trunk_warmup).
    warmup, total_steps = cfg.trunk_warmup, cfg.trunk_warmup + cfg.steps
    probe = warm_optimizer = warm_scheduler = None
    if warmup:
        num_classes = {name: int(t.shape[0]) for name, t in texts.items() if t is not None and t.shape[0]}
        if not num_classes:
            raise ValueError("--trunk-warmup needs a dataset with classes; every dataset of this run is "
                             "class-agnostic")
        with torch.random.fork_rng(devices=[]):  # the same probe on every worker and in every run of the seed
            torch.manual_seed(cfg.seed)
            probe = RegionProbe.for_model(model, num_classes).to(model.device)
        model.backbone.unfreeze()
        warm_modules = torch.nn.ModuleList([model.backbone, probe])
        warm_params = list(warm_modules.parameters())
        warm_optimizer = build_optimizer(warm_modules, optim_cfg)
        warm_scheduler = build_scheduler(warm_optimizer, warmup, optim_cfg)

    step, counts, samples_seen, restored_from = 0, {d.name: 0 for d in cfg.datasets}, 0, None
    state = trainer.restore()
    if state is not None:
        if state.get("training_hash") != cfg.training_hash():
            raise ValueError(f"run {cfg.name!r} in {cfg.storage_path} was started with other training settings; "
                             f"relaunch with the same settings to resume, or use a new --name")
        missing, unexpected = model.load_state_dict(state["trainable"], strict=False)
        assert not unexpected, unexpected
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        mp.load_state_dict(state.get("precision") or {})
        if "warmup" in state:
            probe.load_state_dict(state["warmup"]["probe"])
            warm_optimizer.load_state_dict(state["warmup"]["optimizer"])
            warm_scheduler.load_state_dict(state["warmup"]["scheduler"])
        step, samples_seen, restored_from = int(state["step"]), int(state["samples"]), int(state["step"])
        counts.update({k: int(v) for k, v in state["counts"].items()})
        logger.info("rank %d resumed run %s at step %d", rank, cfg.name, step)
    torch.manual_seed(int(np.random.default_rng([cfg.seed, rank, step]).integers(2 ** 31)))

    streams = {d.name: TD.TrainStream(d.name, trainer.shard_slice(list(shard_sets[d.name].shards)), aug,
                                      seed=int(np.random.default_rng([cfg.seed, rank, i, step]).integers(2 ** 31)),
                                      shuffle_buffer=cfg.shuffle_buffer, storage_options=cfg.storage_options)
               for i, d in enumerate(cfg.datasets)}
    sampler = TD.MixtureSampler([d.name for d in cfg.datasets], [d.weight for d in cfg.datasets], seed=cfg.seed)
    loader = TD.MixtureLoader(streams, sampler, cfg.batch_size, num_workers=cfg.loader_workers)

    def checkpoint_state() -> dict:
        state = {"trainable": _trainable_state(model, _trained_parts(cfg)), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "step": step, "samples": samples_seen,
                 "counts": dict(counts), "training_hash": cfg.training_hash(), "world_size": world,
                 "precision": mp.state_dict()}
        if step < warmup:
            state["warmup"] = {"probe": probe.state_dict(), "optimizer": warm_optimizer.state_dict(),
                               "scheduler": warm_scheduler.state_dict()}
        return state

    def enter_phase() -> list:
        """Trainable parameters and modes of the phase ``step`` is in."""
        if step < warmup:
            model.eval()
            model.backbone.train()
            probe.train()
            return warm_params
        set_trainable(model, STAGE, cfg.unfreeze)
        train_mode(model, STAGE, cfg.unfreeze)
        return params

    files = {MODEL_FILE: lambda p: save_checkpoint(model, p, extra={"trained_steps": str(step), "run": cfg.name,
                                                                    "training_precision": mp.precision})}
    meter = ProgressMeter("[train]", total_steps, cfg.progress_every, start_step=step, started=started,
                          send=trainer.progress)
    if step < warmup:
        meter.phase(step, "trunk warm-up", end=warmup, then=f"{cfg.steps} CLIP2SAM steps")
    elif warmup:
        meter.phase(step, "CLIP2SAM")
    plan = (f"{warmup} trunk warm-up steps, then {cfg.steps} CLIP2SAM steps" if warmup else f"{cfg.steps} steps")
    meter.note(f"{world} worker(s) ready: {cfg.model}, {plan} of {cfg.batch_size} images per worker in "
               f"{mp.precision}" + (f" (from {cfg.precision})" if cfg.precision != mp.precision else "")
               + (f"; resumed at step {step}" if restored_from is not None else ""))
    metrics: dict[str, float] = {}
    if cfg.eval_at_start and heldout and step == 0:
        metrics.update(_evaluate(meter, "before training (step 0)",
                                 lambda: evaluate_heldout(model, heldout, cfg, "initial/"), "initial/"))
    active = enter_phase()
    window: dict[str, list[float]] = {}
    window_start, window_samples = time.time(), 0
    while step < total_steps:
        if cfg.fault_at is not None and step == cfg.fault_at[0] and rank == min(1, world - 1) and \
                not os.path.exists(cfg.fault_at[1]):
            Path(cfg.fault_at[1]).write_text(f"killed at step {step}\n")
            logger.warning("fault injection: rank %d exits at step %d", rank, step)
            os._exit(1)
        name, batch = loader.batch(step)
        if any(s.dataset != name for s in batch):  # the loader guarantees this; checked because tests rely on it
            raise AssertionError(f"step {step}: a batch of {name!r} holds samples of "
                                 f"{sorted({s.dataset for s in batch})}")
        in_warmup = step < warmup
        with mp.autocast():
            if in_warmup:
                losses, stats = trunk_warmup_losses(model, probe, batch, loss_cfg)
            else:
                losses, stats = clip2sam_losses(model, batch, texts[name], loss_cfg)
        opt, sched = (warm_optimizer, warm_scheduler) if in_warmup else (optimizer, scheduler)
        opt.zero_grad(set_to_none=True)
        mp.backward(losses["loss"])
        trainer.all_reduce_gradients(active)
        mp.unscale(opt)
        grad_norm = clip_gradients(active, optim_cfg.clip_grad_norm)
        mp.step(opt)
        sched.step()
        step += 1
        counts[name] += 1
        samples_seen += len(batch) * world
        window_samples += len(batch) * world
        values = {f"{k}/{name}": float(v.detach()) for k, v in losses.items()}
        if stats["labelled"]:
            values[f"{'probe_acc' if in_warmup else 'acc'}/{name}"] = stats["correct"] / stats["labelled"]
        values["loss"] = float(losses["loss"].detach())
        values["grad_norm"] = grad_norm
        for k, v in values.items():
            window.setdefault(k, []).append(v)
        if rank == 0:
            logger.info("step %d/%d %s %s", step, total_steps, name,
                        " ".join(f"{k}={v:.4g}" for k, v in values.items()))
        meter.step(step, values["loss"], len(batch) * world)
        if in_warmup and step == warmup:
            if heldout:
                metrics.update(_evaluate(meter, f"trunk warm-up done (step {step})",
                                         lambda: evaluate_probe(model, probe, heldout, cfg, aug, "warmup/"),
                                         "warmup/"))
            logger.info("rank %d: trunk warm-up done at step %d; the CLIP2SAM steps follow (%s)", rank, step,
                        " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("warmup/")))
            meter.phase(step, "CLIP2SAM")
            active = enter_phase()
        last = step == total_steps
        do_ckpt = step % cfg.checkpoint_every == 0 or last
        do_eval = bool(heldout) and ((cfg.eval_every and step % cfg.eval_every == 0) or last)
        if not (do_ckpt or do_eval or step % cfg.report_every == 0):
            continue
        elapsed = time.time() - window_start
        metrics.update({k: float(np.mean(v)) for k, v in window.items()})
        metrics.update({"step": step, "samples": samples_seen, "lr": sched.get_last_lr()[0],
                        "samples_per_s": window_samples / max(elapsed, 1e-9), "world_size": world,
                        "resumed_from": -1 if restored_from is None else restored_from})
        metrics.update({f"batches/{k}": v for k, v in counts.items()})
        if do_eval or do_ckpt:  # one model on every worker, and in the checkpoint
            trainer.average_norm_statistics(model)
        if do_eval:
            metrics.update(_evaluate(meter, f"after training (step {step})" if last else f"at step {step}",
                                     lambda: evaluate_heldout(model, heldout, cfg, "eval/"), "eval/"))
        trainer.report(dict(metrics), state=checkpoint_state() if do_ckpt else None,
                       files=files if do_ckpt else None)
        window, window_start, window_samples = {}, time.time(), 0
