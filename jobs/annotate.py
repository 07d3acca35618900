"""``ovsam annotate``: WebDataset shards -> OV-SAM on Ray actors -> Parquet, exactly once.

Launch:

    ovsam annotate --input 'data/shards/shard-{000000..000009}.tar' --output out/ --model ovsam-tiny \\
        --vocabulary coco
    python -m jobs.annotate --input s3://bucket/corpus/shard-{000000..004095}.tar --output s3://bucket/ann/ \\
        --model ovsam-rn50x16 --checkpoint ovsam_coco.safetensors --vocabulary lvis --prompts sidecar
    ray job submit --working-dir . -- python -m jobs.annotate --input ... --output ...

A rerun with the same arguments skips committed shards; a rerun with a different model, weights, vocabulary,
thresholds or precision into the same output is refused (use a new --output, or --overwrite to discard the old run).

Precision: ``--precision auto`` (the default) computes in bf16 where the workers' device does so natively (CUDA
GPUs of compute capability 8.0 or later, CPUs with AVX-512-BF16 or AMX) and in fp32 elsewhere. It is resolved once,
on the driver, for the device the workers will use (GPU if the cluster has GPUs and ``--num-gpus-per-worker`` is
not 0, else CPU), and the workers then run that resolved precision, which ``run.json`` records (requested and
resolved) and the config hash includes. The driver judges from its own hardware: on a cluster whose workers differ
from the driver's machine (e.g. GPU workers and a driver without CUDA), pass the precision explicitly.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.args import (PRECISIONS, UsageError, add_detector_arguments, add_grid_arguments, add_storage_options,
                       check_detector, check_ovsam_model, expand_inputs, float_in, positive_int, storage_options)
from pipeline.annotate.detectors.spec import detector_options, parse_prompt_source
from pipeline.annotate.stages import ModelStageConfig

logger = logging.getLogger(__name__)

PRECISION_CHOICES = PRECISIONS


@dataclass(frozen=True)
class AnnotateConfig:
    """The resolved job configuration. ``storage_options`` never enters ``run.json``, manifests or logs."""

    inputs: tuple[str, ...]
    output: str
    stage: ModelStageConfig = field(default_factory=ModelStageConfig)
    batch_size: int = 8
    workers: int | None = None
    num_gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    max_pixels: int = 64 * 1024 * 1024
    images_per_shard: int = 1000
    url_column: str = "url"
    limit: int | None = None
    dry_run: bool = False
    overwrite: bool = False
    ray_address: str | None = None
    progress_every_s: float = 5.0
    quiet: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", dest="inputs", action="append", required=True, metavar="URLS",
                   help="what to annotate (repeatable): WebDataset tar shards (URLs, a glob, a brace range "
                        "shard-{000000..000999}.tar, or a .txt file listing them), a directory or glob of image "
                        "files (recursive), one image file, or a Parquet/CSV/JSONL list of image paths or URLs")
    p.add_argument("--images-per-shard", type=positive_int, default=1000,
                   help="image files per virtual shard, the unit of commit and resume for directory, glob and "
                        "URL-list inputs (default: 1000)")
    p.add_argument("--url-column", default="url",
                   help="the column of a Parquet/CSV/JSONL --input that holds image paths or URLs (default: url)")
    p.add_argument("--output", required=True, help="output URL (local path, s3://, gs://, ...)")
    p.add_argument("--model", default="ovsam-tiny", help="model name (see `ovsam models`)")
    p.add_argument("--checkpoint", default=None, help="project checkpoint file for the model")
    p.add_argument("--vocabulary", default="coco",
                   help="built-in (coco, lvis, imagenet21k), a text class list, or a saved vocabulary")
    p.add_argument("--prompts", default="sidecar",
                   help="sidecar (boxes/points in each sample's json); detector:<owlv2|owlvit|grounding-dino|"
                        "mm-grounding-dino> (an open-vocabulary detector queried with the vocabulary) or "
                        "detector:<torchvision model>; proposals:owlv2 or proposals:<torchvision two-stage model> "
                        "(class-agnostic boxes); grid; whole-image (default: sidecar)")
    add_detector_arguments(p)
    p.add_argument("--top-k", type=positive_int, default=5, help="alternative labels stored per instance (default: 5)")
    p.add_argument("--store-embeddings", action="store_true",
                   help="store float16 region embeddings so `ovsam relabel` can re-label without the images")
    add_grid_arguments(p.add_argument_group("--prompts grid (everything mode: a point grid, the stable masks "
                                            "kept)"))
    p.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                   help="float type the model computes in: auto (bf16 where the workers' device computes it "
                        "natively, else fp32; resolved on the driver), fp32 (as published), bf16, fp16 "
                        "(default: auto); the resolved value enters run.json and the config hash")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the image encoder and prompt decoder (static shapes; slow first batches)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="images per model batch (default: 8)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="model workers (default: one per GPU, else per CPU)")
    p.add_argument("--num-gpus-per-worker", type=float_in(0.0), default=None,
                   help="GPUs each worker reserves (default: 1 where the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-worker", type=float_in(0.0, low_open=True), default=None,
                   help="CPUs each worker reserves (default: chosen from the cluster)")
    p.add_argument("--max-pixels", type=positive_int, default=64 * 1024 * 1024,
                   help="larger images are refused (default: 67108864)")
    p.add_argument("--limit", type=positive_int, default=None, help="process at most this many pending shards")
    p.add_argument("--dry-run", action="store_true", help="list shards and estimate the work; write nothing")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run with another config")
    add_storage_options(p)
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)")
    p.add_argument("--progress-every", dest="progress_every_s", type=float_in(0.0, low_open=True), default=5.0,
                   metavar="SECONDS", help="seconds between progress lines (default: 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines (the summary is still printed)")


def config_from_args(args: argparse.Namespace) -> AnnotateConfig:
    storage = storage_options(args.storage_options)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if getattr(args, "precision", "auto") not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {args.precision!r}")
    stage = ModelStageConfig(**{k: getattr(args, k) for k in ModelStageConfig.__dataclass_fields__
                                if hasattr(args, k)})
    fields = {k: getattr(args, k) for k in AnnotateConfig.__dataclass_fields__
              if k not in ("inputs", "stage", "storage_options") and hasattr(args, k)}
    return AnnotateConfig(inputs=tuple(args.inputs), stage=stage, storage_options=storage, **fields)


def hashed_config(cfg: AnnotateConfig, checkpoint_hash: str | None, vocabulary_hash: str | None,
                  precision: str | None = None, detector_hash: str | None = None) -> dict[str, Any]:
    """The settings that change results (and so the config hash). ``precision`` is the resolved precision the
    workers run (``fp32``/``bf16``/``fp16``; default: ``cfg.stage.precision`` unless that is ``auto``, then fp32)."""
    st = cfg.stage
    if precision is None:
        precision = "fp32" if st.precision == "auto" else st.precision
    source = parse_prompt_source(st.prompts)
    return {
        "model": st.model, "checkpoint_sha256": checkpoint_hash, "vocabulary": st.vocabulary,
        "vocabulary_hash": vocabulary_hash, "prompts": st.prompts,
        "detector_score_thresh": 0.5 if st.detector_score_thresh is None else st.detector_score_thresh,
        "max_detections": st.max_detections, "top_k": st.top_k, "store_embeddings": st.store_embeddings,
        "points_per_side": st.points_per_side, "max_pixels": cfg.max_pixels, "precision": precision,
        # the grid's filters change only grid runs' results (and only their hash, so other runs resume as before)
        **({"stability_score_thresh": st.stability_score_thresh, "box_nms_thresh": st.box_nms_thresh,
            "pred_iou_thresh": st.pred_iou_thresh, "min_mask_area": st.min_mask_area}
           if st.prompts == "grid" else {}),
        **(detector_record(st, detector_hash) if source.uses_detector else {}),
        "compile": bool(st.compile),
    }


def detector_record(st: ModelStageConfig, weights_hash: str | None) -> dict[str, Any]:
    """What the config hash (and run.json's ``hashed``) holds of a detector or proposal source: its name, its
    weights' hash (not their path: moved weights resume), and its resolved template and thresholds."""
    options = detector_options(st)
    source = parse_prompt_source(st.prompts)
    return {"detector": source.spec, "detector_weights_sha256": weights_hash,
            "detector_score_thresh": options.score_thresh, "detector_nms_thresh": options.nms_thresh,
            "max_detections": options.max_detections,
            **({"detector_template": options.template} if source.open_vocabulary else {})}


def workers_device(cfg: AnnotateConfig) -> str:
    """``cuda`` or ``cpu``: the device the job's workers will run the model on, judged before the actor pool is
    planned. ``--num-gpus-per-worker`` decides when given; otherwise the cluster's GPUs when Ray is already
    connected, else this machine's (``torch.cuda.is_available()``), which a local Ray instance would use."""
    if cfg.num_gpus_per_worker is not None:
        return "cuda" if cfg.num_gpus_per_worker > 0 else "cpu"
    try:
        import ray

        if ray.is_initialized():
            return "cuda" if float(ray.cluster_resources().get("GPU", 0.0)) >= 1 else "cpu"
    except ImportError:
        pass
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_job_precision(cfg: AnnotateConfig) -> tuple[str, str]:
    """``(device, resolved precision)`` for the job's workers (see :func:`workers_device` and
    ``ovsam.precision.resolve_precision``)."""
    from ovsam.precision import resolve_precision

    device = workers_device(cfg)
    return device, resolve_precision(cfg.stage.precision, device)


def _file_sha256(path: str | None) -> str | None:
    if path is None:
        return None
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def estimate_work(shards: list[Any], storage_options: dict[str, Any]) -> tuple[int, int, int]:
    """(bytes, samples, shards with an index) of ``shards``, from their sizes and shard indexes (no tar is read)."""
    from concurrent.futures import ThreadPoolExecutor

    import fsspec

    from pipeline.inputs.sources import read_expected_count

    def one(shard: Any) -> tuple[int, int | None]:
        if shard.members:  # a virtual shard of image files: its listing has the sizes and the count
            return sum(shard.sizes), len(shard.members)
        fs, path = fsspec.core.url_to_fs(shard.url, **storage_options)
        try:
            size = int(fs.size(path) or 0)
        except OSError:
            size = 0
        return size, read_expected_count(shard.url, storage_options)

    with ThreadPoolExecutor(max_workers=16) as pool:
        found = list(pool.map(one, shards))
    counts = [c for _, c in found if c is not None]
    return sum(size for size, _ in found), sum(counts), len(counts)


def check_listing(shards: list[Any], committed: set[str], ledger: Any) -> None:
    """Refuse to resume when a committed virtual shard (image files) now stands for other files: its manifest
    records the range and digest of its files' names, which must equal the shard's from today's listing."""
    changed = []
    manifests = None
    for ref in shards:
        if ref.members and ref.name in committed:
            manifests = ledger.manifests() if manifests is None else manifests
            recorded = manifests.get(ref.name, {}).get("input_url")
            if recorded != ref.url:
                changed.append((ref.name, recorded, ref.url))
    if changed:
        name, recorded, now = changed[0]
        raise UsageError(f"the image files of --input changed since {len(changed)} committed shard(s) were written "
                         f"(e.g. {name}: committed as {recorded}, now {now}); files added, removed or renamed, or "
                         "another --images-per-shard, move images between shards. Restore the listing, or write "
                         "to a new --output (or pass --overwrite to start over)")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def progress_printer(expected_images: float | None) -> Any:
    """The driver's progress line: shards committed, images and instances done (shards in flight included, as
    their workers last reported), rates, and an ETA from the expected image count (the shard indexes, extrapolated
    to shards without one) or, without any index, from the shards committed so far."""

    def show(summary: Any, total: int, seconds: float, images: int | None = None, prompts: int | None = None) -> None:
        done = len(summary.per_shard) + len(summary.failed)
        images = summary.images if images is None else images
        prompts = summary.instances if prompts is None else prompts
        rate = images / seconds if seconds > 0 else 0.0
        eta = ""
        if done < total:
            if expected_images and rate > 0:
                eta = f"  ETA {_duration(max(0.0, expected_images - images) / rate)}"
            elif done and seconds > 0:
                eta = f"  ETA {_duration((total - done) * seconds / done)}"
        print(f"[annotate] shards {done}/{total}  images {images:,} ({rate:.1f}/s)  instances {prompts:,} "
              f"({prompts / seconds if seconds > 0 else 0.0:.1f}/s){eta}", flush=True)

    return show


UNTRAINED_WARNING = (
    "[annotate] WARNING: no --checkpoint: {model}'s neck and head are randomly initialised, so its masks and labels "
    "mean nothing (run.json records weights.trained = false). Pass --checkpoint: `make demo` trains "
    "demo_out/model/ovsam-tiny-synthetic.safetensors; `ovsam convert-official` builds the published ovsam-rn50x16."
)


class _RayAuthNotice(logging.Filter):
    """Ray's notice about token authentication on a local cluster, replaced by one plain line per process."""

    shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if not text.startswith("Token authentication is"):
            return True
        if not _RayAuthNotice.shown:
            _RayAuthNotice.shown = True
            state = "on" if "is enabled" in text else "off"
            print(f"[annotate] Ray: token authentication is {state} for the local Ray instance this job starts "
                  f"(Ray's default; set RAY_AUTH_MODE=token or =disabled to choose; "
                  f"https://docs.ray.io/en/latest/ray-security/token-auth.html)", file=sys.stderr, flush=True)
        return False


def plain_ray_auth_notice() -> None:
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _RayAuthNotice) for f in log.filters):
        log.addFilter(_RayAuthNotice())


def validate_config(cfg: AnnotateConfig, fs: Any, root: str) -> None:
    """Every check that needs no Ray and writes nothing, run on the driver before anything starts: numeric ranges,
    the prompt mode, the detector (built once from its weights), the model name, the checkpoint file and the
    output location. Raises :class:`jobs.args.UsageError` (exit 2) naming the option."""
    st = cfg.stage
    for flag, value, minimum in (("--batch-size", cfg.batch_size, 1), ("--workers", cfg.workers, 1),
                                 ("--max-pixels", cfg.max_pixels, 1), ("--limit", cfg.limit, 1),
                                 ("--top-k", st.top_k, 1), ("--max-detections", st.max_detections, 1),
                                 ("--points-per-side", st.points_per_side, 1),
                                 ("--min-mask-area", st.min_mask_area, 0)):
        if value is not None and value < minimum:
            raise UsageError(f"{flag} must be >= {minimum}, got {value}")
    for flag, value in (("--detector-score-thresh", 0.5 if st.detector_score_thresh is None else
                         st.detector_score_thresh),
                        ("--detector-nms-thresh", 1.0 if st.detector_nms_thresh is None else st.detector_nms_thresh),
                        ("--stability-score-thresh", st.stability_score_thresh),
                        ("--box-nms-thresh", st.box_nms_thresh), ("--pred-iou-thresh", st.pred_iou_thresh)):
        if not 0.0 <= value <= 1.0:
            raise UsageError(f"{flag} must be in [0, 1], got {value}")
    if st.precision not in PRECISION_CHOICES:
        raise UsageError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {st.precision!r}")
    check_detector(st.prompts, st.detector_weights, st.vocabulary, detector_options_or_usage(st))
    check_ovsam_model(st.model, st.checkpoint)
    if fs.isfile(root):
        raise UsageError(f"--output {cfg.output} is a file; pass a directory (a local path or a URL)")


def detector_options_or_usage(st: ModelStageConfig) -> Any:
    """The resolved detector options (:func:`pipeline.annotate.stages.detector_options`); a bad value or prompt
    mode is a :class:`UsageError`."""
    try:
        return detector_options(st)
    except ValueError as e:
        raise UsageError(str(e)) from None


def run_annotate(cfg: AnnotateConfig) -> Any:
    """Resolve shards and config, skip committed shards, run the rest on Ray, print a summary.

    Returns the ``RunSummary`` (None for a dry run). Invalid options and an ``--input`` that does not expand (a glob
    matching nothing, a missing shard or list file) raise :class:`jobs.args.UsageError` before anything is written
    or Ray starts.
    """
    import fsspec

    import ovsam
    from pipeline.annotate.ledger import Ledger, config_hash, write_run_json
    from pipeline.annotate.run import plan_cluster, run_shards
    from pipeline.annotate.worker import WorkerConfig

    fs, root = fsspec.core.url_to_fs(cfg.output, **cfg.storage_options)
    validate_config(cfg, fs, root)
    shards = expand_inputs("--input", list(cfg.inputs), cfg.storage_options, images_per_shard=cfg.images_per_shard,
                           url_column=cfg.url_column)
    model = ovsam.build_ovsam(cfg.stage.model, checkpoint=cfg.stage.checkpoint)
    untrained = cfg.stage.checkpoint is None
    if untrained:
        print(UNTRAINED_WARNING.format(model=cfg.stage.model), file=sys.stderr, flush=True)
    try:
        vocabulary = ovsam.Vocabulary.resolve(cfg.stage.vocabulary, model, progress=False)
    except (ValueError, OSError) as e:
        raise UsageError(f"--vocabulary {cfg.stage.vocabulary}: {e}") from None
    device, precision = resolve_job_precision(cfg)
    from pipeline.annotate.detectors.hf import weights_fingerprint

    detector_hash = weights_fingerprint(cfg.stage.detector_weights) if cfg.stage.detector_weights else None
    hashed = hashed_config(cfg, _file_sha256(cfg.stage.checkpoint), vocabulary.content_hash, precision,
                           detector_hash)
    chash = config_hash(hashed)
    ledger = Ledger(fs, root)
    ledger.check_config(chash, hashed, overwrite=cfg.overwrite)
    done = ledger.committed_shards(chash)
    check_listing(shards, done, ledger)
    pending = [s for s in shards if s.name not in done]
    if cfg.limit is not None:
        pending = pending[: cfg.limit]
    print(f"[annotate] {len(shards)} shards: {len(shards) - len([s for s in shards if s.name not in done])} "
          f"committed, {len(pending)} to process; precision {precision} on {device} workers"
          + (f" (from {cfg.stage.precision})" if cfg.stage.precision != precision else ""), flush=True)
    if cfg.dry_run:
        for s in pending[:20]:
            print(f"  {s.name}  {s.url}")
        if len(pending) > 20:
            print(f"  ... {len(pending) - 20} more")
        nbytes, samples, indexed = estimate_work(pending, cfg.storage_options)
        guess = "" if indexed == len(pending) or not indexed else \
            f"; about {samples / indexed * len(pending):,.0f} in all, extrapolated"
        print(f"[annotate] dry run: {len(pending)} shards, {nbytes / 1e6:,.1f} MB to read, {samples:,} samples in "
              f"the {indexed} shards with an index{guess}; nothing written", flush=True)
        return None
    if not pending:  # a finished rerun: no run.json rewrite, no Ray
        print(f"[annotate] nothing to do: all {len(shards)} shards are committed in {cfg.output}", flush=True)
        from pipeline.annotate.run import RunSummary

        return RunSummary(shards_total=len(shards), shards_skipped=len(shards))
    public = {k: v for k, v in asdict(cfg).items() if k != "storage_options"}
    write_run_json(fs, root, {"config": public, "hashed": hashed, "config_hash": chash,
                              "precision": {"requested": cfg.stage.precision, "resolved": precision,
                                            "device": device, "compile": bool(cfg.stage.compile)},
                              "vocabulary": vocabulary_record(vocabulary),
                              "weights": {"checkpoint": cfg.stage.checkpoint, "trained": not untrained},
                              "model_config": model.config.to_dict(), "versions": package_versions()})
    del model
    ledger.cleanup_tmp()
    import ray

    if not ray.is_initialized():
        plain_ray_auth_notice()
        ray.init(address=cfg.ray_address, ignore_reinit_error=True, log_to_driver=False)
    plan = plan_cluster(cfg.workers, cfg.num_gpus_per_worker, cfg.cpus_per_worker)
    planned = "cuda" if plan.num_gpus > 0 else "cpu"
    if planned != device and cfg.stage.precision == "auto":
        logger.warning("--precision auto was resolved to %s for %s workers, but the workers run on %s; they run %s "
                       "as recorded (pass --precision to choose)", precision, device, planned, precision)
    # the workers run the precision resolved here, which is the one hashed and recorded in run.json
    stage = dataclasses.replace(cfg.stage, device=planned, precision=precision)
    worker_cfg = WorkerConfig(output=cfg.output, stage=stage, config_hash=chash, batch_size=cfg.batch_size,
                              cpus=plan.num_cpus, max_pixels=cfg.max_pixels,
                              storage_options=dict(cfg.storage_options))
    t0 = time.perf_counter()
    printer = None
    if not cfg.quiet:
        _, samples, indexed = estimate_work(pending[:200], cfg.storage_options)
        printer = progress_printer(samples / indexed * len(pending) if indexed else None)
    summary = run_shards(pending, worker_cfg, plan, on_progress=printer, progress_every_s=cfg.progress_every_s,
                         shards_skipped=len(shards) - len(pending))
    seconds = time.perf_counter() - t0
    print(f"[annotate] done in {seconds:.1f}s: {len(summary.per_shard)} shards, {summary.images} images, "
          f"{summary.instances} instances ({summary.images / max(seconds, 1e-9):.2f} images/s)")
    print(f"[annotate] statuses: {json.dumps(summary.statuses(), sort_keys=True)}")
    print("[annotate] stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.stage_seconds().items())
          + "; overlapped: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.background_seconds().items()))
    if summary.per_shard:
        print(f"[annotate] model busy {summary.model_busy_pct:.0f}% (time inside model calls "
              f"{summary.model_seconds:.1f}s / actor processing wall {summary.actor_seconds:.1f}s, summed over "
              f"shards); precision {', '.join(summary.precisions()) or precision}; worker peak memory "
              f"{summary.peak_rss_mb():,.0f} MiB")
    ran = [p for p in summary.precisions() if p != precision]
    if ran:  # cannot happen while workers build the precision they are given; run.json would then be wrong
        logger.error("workers ran precision %s, not the %s recorded in run.json", ", ".join(ran), precision)
    truncated = [s["shard"] for s in summary.per_shard if s["truncated"]]
    if truncated:
        print(f"[annotate] truncated shards (samples after the cut are missing): {', '.join(truncated)}")
    damaged = [s for s in summary.per_shard if s.get("read_error") and not s["truncated"]]
    for s in damaged[:20]:
        print(f"[annotate] shard {s['shard']} read with problems: {s['read_error']}")
    if len(damaged) > 20:
        print(f"[annotate] ... {len(damaged) - 20} more shards with read problems (see their manifests)")
    for name, err in summary.failed.items():
        print(f"[annotate] FAILED {name}: {err}", file=sys.stderr)
    ledger.remove_empty_tmp()
    if untrained:
        print(UNTRAINED_WARNING.format(model=cfg.stage.model), file=sys.stderr, flush=True)
    return summary


def vocabulary_record(vocabulary) -> dict:
    """What run.json records of the vocabulary: names, synonyms, split (1 base, 2 novel, 0 excluded, or None),
    content hash and CLIP model; ``ovsam eval coco`` matches categories and splits with it."""
    split = None if vocabulary.split is None else [int(v) for v in vocabulary.split]
    return {"names": list(vocabulary.names), "synonyms": [list(s) for s in vocabulary.synonyms], "split": split,
            "content_hash": vocabulary.content_hash, "clip_model": vocabulary.clip_model}


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the output (for run.json)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ovsam", "torch", "open_clip_torch", "segment-anything", "ray", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovsam annotate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run_annotate(config_from_args(args))
        return 1 if summary is not None and summary.failed else 0
    except UsageError as e:
        print(f"ovsam annotate: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"ovsam annotate: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
