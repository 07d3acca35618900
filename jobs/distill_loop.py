"""The SAM2CLIP distillation loop that every Ray Train worker of ``ovsam distill`` runs (see ``jobs/distill.py``).

``train_loop(loop_config)`` reads top to bottom: build the student (and the online teacher), restore the latest
checkpoint or copy the teacher's positional embedding into the fresh neck, measure the held-out MSE, then train the
neck on the MSE to the teacher's embedding with hand-averaged gradients, reporting and checkpointing through
``jobs.trainer``; the final report's checkpoint holds the project-format student and the released neck file. Rank 0
sends the driver progress lines (``jobs.progress.ProgressMeter``): a step line at least every ``progress_every``
seconds (step/total, loss, images/s, elapsed, ETA) and each held-out MSE as it is measured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from jobs.progress import DEFAULT_PROGRESS_EVERY

logger = logging.getLogger(__name__)

STAGE = "sam2clip"
STUDENT_FILE = "student.safetensors"
RELEASED_DIR = "released"
PUBLISHED_TOTAL_BATCH = 16  # 2 images x 8 GPUs; the base of auto_scale_lr
SHORT_RUN_WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class DistillConfig:
    """A distillation run. ``inputs`` (teacher online) or ``teacher_cache`` gives the training images;
    ``heldout``/``heldout_cache`` the held-out ones. ``lr``/``warmup_steps`` None = the published rule (module
    docstring). ``storage_options`` (fsspec, for shards, cache and storage path) never enter logs or metrics."""

    student: str = "ovsam-rn50x16"
    student_checkpoint: str | None = None
    student_clip: str | None = None
    teacher: str = "sam-vit-h"
    teacher_checkpoint: str | None = None
    inputs: tuple[str, ...] = ()
    teacher_cache: str | None = None
    heldout: tuple[str, ...] = ()
    heldout_cache: str | None = None
    steps: int = 1000
    batch_size: int = 2
    lr: float | None = None
    warmup_steps: int | None = None
    eval_every: int = 500
    checkpoint_every: int = 500
    log_every: int = 10
    report_every: int = 20
    progress_every: float = DEFAULT_PROGRESS_EVERY
    quiet: bool = False  # no progress lines (the summary and errors still print)
    seed: int = 0
    precision: str = "fp32"  # the forward pass's float type (ovsam.training.MixedPrecision), resolved per worker
    shuffle_buffer: int = 64
    loader_workers: int = 0
    name: str = "distill"
    storage_path: str = "runs"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    num_to_keep: int = 2
    output: str | None = None
    export_released: str | None = None
    ray_address: str | None = None
    fail_at_step: int | None = None  # fault injection (tests): rank 0 raises once, in an attempt that started fresh
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


class InjectedFailure(RuntimeError):
    """Raised by ``fail_at_step`` to test recovery."""


# ----------------------------------------------------------------------------------------------------------------
# Student set-up

def load_clip_weights(model: Any, clip: str) -> None:
    """Load CLIP weights (an open_clip tag such as ``openai`` or a file) into the student's frozen towers."""
    from ovsam.checkpoint import read_clip_state_dict

    state = read_clip_state_dict(clip, model.config)
    mapped = {("backbone." + k if k.startswith("visual.") else "text.clip." + k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if k.startswith(("backbone.visual.", "text.clip."))]
    if missing or unexpected:
        raise ValueError(f"CLIP weights {clip} do not fit student '{model.config.name}': missing "
                         f"{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")


def optim_config(cfg: DistillConfig, world_size: int) -> Any:
    """The published SAM2CLIP optimiser with lr scaled to the total batch and the warm-up fitted to the run."""
    from ovsam.training import published_optim

    base = published_optim(STAGE)
    lr = cfg.lr if cfg.lr is not None else base.lr * cfg.batch_size * world_size / PUBLISHED_TOTAL_BATCH
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else \
        min(base.warmup_steps, math.ceil(SHORT_RUN_WARMUP_FRACTION * cfg.steps))
    return dataclasses.replace(base, lr=lr, warmup_steps=warmup)


def _teacher_pos_embed(cfg: DistillConfig, teacher: Any) -> Any:
    if teacher is not None:
        return teacher.image_encoder.pos_embed.detach()
    if cfg.teacher_checkpoint is not None:
        from ovsam.checkpoint import read_state_dict

        return read_state_dict(cfg.teacher_checkpoint).get("image_encoder.pos_embed")
    return None


# ----------------------------------------------------------------------------------------------------------------
# The training loop (one per Ray Train worker)


def _evaluate(student: Any, teacher: Any, urls: list[str], spec: Any, cached: bool, cfg: DistillConfig) -> float:
    """Held-out MSE over all elements of all held-out images (every worker evaluates its share)."""
    import torch

    from jobs.trainer import all_reduce_mean
    from pipeline.training.distill_data import batched, iter_once

    sse, count = 0.0, 0
    student.eval()
    with torch.no_grad():
        for batch in batched(iter_once(urls, spec, with_target=cached, storage_options=cfg.storage_options),
                             cfg.batch_size):
            x = batch["images"].to(student.device)
            target = batch["targets"] if cached else teacher.encode_image(x)
            emb = student.neck(student.backbone(x))
            sse += float(((emb.double() - target.to(emb.device).double()) ** 2).sum())
            count += target.numel()
    total = all_reduce_mean({"sse": sse, "count": float(count)})
    return total["sse"] / total["count"] if total["count"] else float("nan")


def train_loop(loop_config: dict) -> None:
    """Train the student's neck for ``config.steps`` steps; see the module docstring."""
    import torch
    import torch.nn.functional as F

    from jobs.progress import ProgressMeter
    from jobs.trainer import (all_reduce_gradients, all_reduce_mean, progress, report, restore, shard_slice,
                              world)
    from ovsam import build_ovsam
    from ovsam.checkpoint import export_released, save_checkpoint
    from ovsam.training import (MixedPrecision, build_optimizer, build_scheduler, clip_gradients, set_trainable,
                                train_mode)
    from pipeline.training.distill_data import DistillStream, InputSpec, batched

    started = time.monotonic()
    cfg: DistillConfig = loop_config["config"]
    plan: dict = loop_config["plan"]
    rank, world_size = world()
    progress(f"[distill] {world_size} worker(s) started: building {cfg.student}"
             + (f" and the teacher {cfg.teacher}" if plan["needs_teacher"] else ""))
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    spec = InputSpec.from_dict(plan["spec"])
    student = build_ovsam(cfg.student, checkpoint=cfg.student_checkpoint, device=device)
    if cfg.student_clip is not None:
        load_clip_weights(student, cfg.student_clip)
    params = set_trainable(student, STAGE)
    mp = MixedPrecision(cfg.precision, device)
    teacher = None
    if plan["needs_teacher"]:
        teacher = build_ovsam(cfg.teacher, checkpoint=cfg.teacher_checkpoint, device=device).requires_grad_(False)
    optim = optim_config(cfg, world_size)
    optimizer = build_optimizer(student, optim)
    scheduler = build_scheduler(optimizer, cfg.steps, optim)

    state = restore()
    if state is not None:
        if (state["student"], state["teacher"]) != (student.config.name, plan["teacher"]):
            raise ValueError(f"run '{cfg.name}' distils {state['teacher']} -> {state['student']}, not "
                             f"{plan['teacher']} -> {student.config.name}; use another --name to start a new run")
        if state["steps"] != cfg.steps or state["world_size"] != world_size:
            changed = [what for what, differs in (("the learning-rate schedule", state["steps"] != cfg.steps),
                                                  ("the data order", state["world_size"] != world_size)) if differs]
            logger.warning("resuming run '%s' (%d steps on %d workers) with %d steps on %d workers: %s change",
                           cfg.name, state["steps"], state["world_size"], cfg.steps, world_size, " and ".join(changed))
        student.neck.load_state_dict(state["neck"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        mp.load_state_dict(state.get("precision") or {})
        step, evals = int(state["step"]), list(state["evals"])
        logger.info("rank %d: resumed run '%s' at step %d", rank, cfg.name, step)
    else:
        step, evals = 0, []
        pos = _teacher_pos_embed(cfg, teacher)
        if pos is not None and tuple(pos.shape) == tuple(student.neck.pos_embed.shape):
            student.neck.pos_embed.copy_(pos)
        elif rank == 0:
            logger.info("the neck keeps its own positional embedding (teacher's: %s, neck's: %s)",
                        None if pos is None else tuple(pos.shape), tuple(student.neck.pos_embed.shape))
    started_at = step
    meter = ProgressMeter("[distill]", cfg.steps, cfg.progress_every, start_step=step, started=started,
                          send=progress)
    meter.note(f"{world_size} worker(s) ready: {plan['teacher']} -> {student.config.name}'s neck, "
               + ("teacher embeddings from the cache" if plan["train_cached"] else "teacher online")
               + f", {cfg.steps} steps of {cfg.batch_size} images per worker in {mp.precision}"
               + (f"; resumed at step {step}" if step else ""))

    def make_state() -> dict:
        return {"step": step, "neck": student.neck.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "evals": evals, "student": student.config.name,
                "teacher": plan["teacher"], "steps": cfg.steps, "world_size": world_size,
                "precision": mp.state_dict()}

    heldout = plan["heldout_urls"][rank::world_size]

    def evaluate() -> float:
        meter.note(f"step {step}: measuring the held-out MSE...")
        with meter.aside() as timer:
            mse = _evaluate(student, teacher, heldout, spec, plan["heldout_cached"], cfg)
        train_mode(student, STAGE)
        evals.append({"step": step, "heldout_mse": mse})
        first, change = evals[0]["heldout_mse"], ""
        if len(evals) > 1 and first:
            change = f", {abs(100 * (1 - mse / first)):.1f}% {'below' if mse <= first else 'above'} step " \
                     f"{evals[0]['step']}'s"
        meter.note(f"step {step}: held-out MSE {mse:.6f}{change} ({timer['seconds']:.0f} s)")
        return mse

    if plan["heldout_urls"] and step == 0 and not evals:
        mse = evaluate()
        if rank == 0:
            logger.info("step 0: held-out MSE %.6f", mse)

    urls = shard_slice(plan["train_urls"])
    stream = DistillStream(urls, spec, with_target=plan["train_cached"], seed=cfg.seed * 1009 + rank,
                           skip=step * cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer,
                           storage_options=cfg.storage_options)
    # a loader worker without a shard of its own would end the stream early
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=min(cfg.loader_workers, len(urls)))
    batches = batched(iter(loader), cfg.batch_size)
    train_mode(student, STAGE)
    tick = time.perf_counter()
    losses: list[float] = []
    while step < cfg.steps:
        batch = next(batches)
        x = batch["images"].to(device)
        with torch.no_grad():
            target = batch["targets"].to(device) if plan["train_cached"] else teacher.encode_image(x)
        with mp.autocast():
            with torch.no_grad():
                feats = student.backbone(x)
            emb = student.neck(feats)
        if emb.shape != target.shape:
            raise ValueError(f"student '{student.config.name}' gave a {tuple(emb.shape)} embedding batch but teacher "
                             f"'{plan['teacher']}' {tuple(target.shape)}; the shapes must agree")
        loss = F.mse_loss(emb.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        mp.backward(loss)
        all_reduce_gradients(params)
        mp.unscale(optimizer)
        grad_norm = clip_gradients(params, optim.clip_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        mp.step(optimizer)
        scheduler.step()
        step += 1
        if cfg.fail_at_step == step and started_at == 0 and rank == 0:
            raise InjectedFailure(f"injected failure at step {step} (fail_at_step)")
        now = time.perf_counter()
        metrics = all_reduce_mean({"loss": float(loss.detach()), "images_per_s": x.shape[0] / max(now - tick, 1e-9)})
        tick = now
        metrics.update(step=step, lr=lr, grad_norm=grad_norm, images_per_s=metrics["images_per_s"] * world_size)
        meter.step(step, metrics["loss"], x.shape[0] * world_size)
        if plan["heldout_urls"] and cfg.eval_every > 0 and step % cfg.eval_every == 0 and step < cfg.steps:
            metrics["heldout_mse"] = evaluate()
        losses.append(metrics["loss"])
        if rank == 0 and (step % max(1, cfg.log_every) == 0 or "heldout_mse" in metrics):
            logger.info("step %d/%d: loss %.6f lr %.3g grad norm %.3g%s", step, cfg.steps, metrics["loss"], lr,
                        grad_norm, f" held-out MSE {metrics['heldout_mse']:.6f}" if "heldout_mse" in metrics else "")
        checkpoint_due = cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
        if step < cfg.steps and (checkpoint_due or "heldout_mse" in metrics or step % cfg.report_every == 0):
            # every step's loss since the last report travels with this one
            metrics.update(losses=losses, loss_mean=sum(losses) / len(losses), evals=json.dumps(evals))
            report(metrics, state=make_state() if checkpoint_due else None)
            losses = []
        tick = time.perf_counter()

    final: dict[str, Any] = {"step": step, "resumed_from": started_at, "done": True, "losses": losses}
    if plan["heldout_urls"]:
        if not evals or evals[-1]["step"] != step:
            evaluate()
        final.update(heldout_mse=evals[-1]["heldout_mse"], heldout_mse_initial=evals[0]["heldout_mse"],
                     evals=json.dumps(evals))
    if rank == 0:
        logger.info("finished at step %d: %s", step, {k: v for k, v in final.items() if k != "losses"})
    student.eval()
    report(final, state=make_state(), files={
        STUDENT_FILE: lambda path: save_checkpoint(student, path, extra={"distilled_from": plan["teacher"],
                                                                          "distill_steps": str(step),
                                                                          "training_precision": mp.precision}),
        RELEASED_DIR: lambda path: export_released(student, path),
    })
