"""``ovsam relabel``: re-label a stored annotation run with a new vocabulary from its stored region embeddings.

Launch:

    ovsam relabel --input out/ --vocabulary lvis --output out-lvis/
    python -m jobs.relabel --input s3://bucket/ann/ --vocabulary classes.txt --output s3://bucket/ann-classes/ \\
        --top-k 10 --storage-options '{"client_kwargs": {"endpoint_url": "http://127.0.0.1:5000"}}'
    ray job submit --working-dir . -- python -m jobs.relabel --input ... --vocabulary ... --output ...

The input must come from ``ovsam annotate --store-embeddings`` (or from an earlier relabel of such a run). No
image is read: each committed input shard's instance rows get new labels, label names, label scores and top-k
from their stored float16 head/CLIP embeddings and the new vocabulary, embedded with the CLIP text tower of the
model recorded in the input's ``run.json``. The output follows the annotation job's contract: per shard
``instances/<shard>.parquet`` (same schema), ``images/<shard>.parquet`` (same rows), ``_manifest/<shard>.json``
written last, and ``run.json`` naming the source run. A rerun skips committed shards; a rerun with another
vocabulary or top-k into the same output is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.annotate import package_versions, vocabulary_record
from jobs.args import UsageError, add_storage_options, positive_int, storage_options

logger = logging.getLogger(__name__)

#: Rows classified per call: bounds the ``rows x classes`` score matrices for 20k-class vocabularies.
CHUNK_ROWS = 1024


@dataclass(frozen=True)
class RelabelConfig:
    """The resolved job configuration. ``storage_options`` never enters ``run.json``, manifests or logs."""

    input: str
    output: str
    vocabulary: str
    top_k: int | None = None
    checkpoint: str | None = None
    threads: int = 2
    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class RelabelSummary:
    """What a run did: committed shards (with instance counts), shards skipped as already committed, failures."""

    per_shard: list[dict[str, Any]] = field(default_factory=list)
    shards_skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return sum(s["instances"] for s in self.per_shard)

    @property
    def changed(self) -> int:
        return sum(s["changed"] for s in self.per_shard)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="annotation output URL (annotated with --store-embeddings)")
    p.add_argument("--vocabulary", required=True,
                   help="built-in (coco, lvis, imagenet21k), a text class list, or a saved vocabulary")
    p.add_argument("--output", required=True, help="output URL for the re-labelled run")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="alternative labels stored per instance, >= 1 (default: the input run's)")
    p.add_argument("--checkpoint", default=None,
                   help="the input run's model checkpoint, if it has moved since (its sha256 must match)")
    p.add_argument("--threads", type=positive_int, default=2,
                   help="shards read, re-labelled and written in parallel (default: 2)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output with another config")
    add_storage_options(p, help='fsspec options as a JSON object, for input and output, e.g. '
                                '\'{"client_kwargs": {"endpoint_url": "http://..."}}\'')


def config_from_args(args: argparse.Namespace) -> RelabelConfig:
    """The config of parsed arguments. A value out of range (a namespace built without this parser's types) raises
    :class:`jobs.args.UsageError` (exit 2), like argparse's own checks."""
    storage = storage_options(args.storage_options)
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    return RelabelConfig(input=args.input, output=args.output, vocabulary=args.vocabulary, top_k=args.top_k,
                         checkpoint=args.checkpoint, threads=args.threads, overwrite=args.overwrite,
                         storage_options=storage)


def _file_sha256(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_run(ledger: Any, url: str) -> dict[str, Any]:
    """The input's ``run.json``, checked for what re-labelling needs."""
    record = ledger.run_record()
    if record is None:
        raise ValueError(f"{url} has no run.json; expected the output directory of `ovsam annotate`")
    hashed = record.get("hashed", {})
    stage = record.get("config", {}).get("stage", {})
    if not hashed.get("store_embeddings") or stage.get("prompts", hashed.get("prompts")) == "grid":
        why = ("it was annotated in grid mode, which stores none" if stage.get("prompts") == "grid"
               else "it was annotated without them")
        raise ValueError(f"{url} has no stored region embeddings ({why}); annotate with --store-embeddings "
                         "(box, point or detector prompts) to be able to relabel")
    for key in ("model_config", "config_hash"):
        if key not in record:
            raise ValueError(f"{url}/run.json has no {key!r}; expected a run.json written by `ovsam annotate`")
    if "model" not in stage:
        raise ValueError(f"{url}/run.json has no config.stage.model; expected a run.json written by `ovsam annotate`")
    return record


def _build_model(cfg: RelabelConfig, source: dict[str, Any]) -> Any:
    """The input run's model (for its CLIP text tower and recognition settings), checked against run.json."""
    import ovsam

    stage = source["config"]["stage"]
    checkpoint = cfg.checkpoint if cfg.checkpoint is not None else stage.get("checkpoint")
    want = source.get("hashed", {}).get("checkpoint_sha256")
    if checkpoint is not None:
        from pathlib import Path

        if not Path(checkpoint).is_file():
            raise ValueError(f"the input run used checkpoint {checkpoint!r}, which is not a file here; pass "
                             "--checkpoint PATH with the same weights")
        got = _file_sha256(checkpoint)
        if want is not None and got != want:
            raise ValueError(f"checkpoint {checkpoint} has sha256 {got[:12]}..., the input run used {want[:12]}...; "
                             "pass --checkpoint with the weights the input was annotated with")
    elif want is not None:
        raise ValueError("the input run used a checkpoint but run.json records no path; pass --checkpoint PATH")
    model = ovsam.build_ovsam(stage["model"], checkpoint=checkpoint)
    built = model.config.to_dict()
    if built != source["model_config"]:
        diff = sorted(k for k in set(built) | set(source["model_config"])
                      if built.get(k) != source["model_config"].get(k))
        raise ValueError(f"model {stage['model']!r} as built here differs from the input run's model_config in "
                         f"{', '.join(diff)}; relabel with the model version the input was annotated with")
    return model


def hashed_config(source: dict[str, Any], vocabulary_spec: str, vocabulary_hash: str, top_k: int) -> dict[str, Any]:
    """The settings that change results (and so the config hash) of a relabel run."""
    hashed = source.get("hashed", {})
    return {
        "job": "relabel", "source_config_hash": source["config_hash"], "model": source["config"]["stage"]["model"],
        "checkpoint_sha256": hashed.get("checkpoint_sha256"), "prompts": hashed.get("prompts"),
        "store_embeddings": True, "vocabulary": vocabulary_spec, "vocabulary_hash": vocabulary_hash, "top_k": top_k,
    }


def _read_verified(fs: Any, root: str, entry: dict[str, Any]) -> Any:
    """A committed Parquet file as a table, after checking its bytes against the manifest's sha256."""
    from pipeline.inputs.parquet import parquet_from_bytes

    path = f"{root}/{entry['path']}"
    with fs.open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(f"{path}: sha256 {digest[:12]}... does not match its manifest ({entry['sha256'][:12]}...); "
                         "the input changed after it was committed")
    return parquet_from_bytes(data)


def relabel_shard(src_fs: Any, src_root: str, dst_fs: Any, dst_root: str, manifest: dict[str, Any], vocabulary: Any,
                  recognition: Any, top_k: int, config_hash: str) -> dict[str, Any]:
    """Re-label one committed input shard and commit it under ``dst_root``; returns counts.

    ``manifest`` is the input shard's manifest: its files are read and checked against it, and its input URL and
    read report are carried into the new manifest (the output still describes the same input tar).
    """
    from pipeline.annotate.relabel import relabel_rows
    from pipeline.annotate.sinks import commit_shard
    from pipeline.inputs.sources import ShardReadReport

    shard = manifest["shard"]
    instances = _read_verified(src_fs, src_root, manifest["files"]["instances"]).to_pylist()
    images = _read_verified(src_fs, src_root, manifest["files"]["images"]).to_pylist()
    rows: list[dict[str, Any]] = []
    for start in range(0, len(instances), CHUNK_ROWS):
        rows += relabel_rows(instances[start:start + CHUNK_ROWS], vocabulary, recognition, top_k)
    changed = sum(a["label_name"] != b["label_name"] for a, b in zip(instances, rows))
    report = ShardReadReport(samples_read=manifest.get("samples_read"), truncated=bool(manifest.get("truncated")),
                             error=manifest.get("read_error"), expected=manifest.get("samples_expected"),
                             url=manifest.get("input_url", ""))
    commit_shard(dst_fs, dst_root, shard, rows, images, input_url=manifest.get("input_url", ""),
                 config_hash=config_hash, read_report=report, attempt_id=uuid.uuid4().hex[:12])
    return {"shard": shard, "images": len(images), "instances": len(rows), "changed": changed}


def run_relabel(cfg: RelabelConfig) -> RelabelSummary:
    """Check the input, build the vocabulary with the input's model, re-label every pending shard, print a summary.

    Raises ``ValueError`` for an input without stored embeddings, a model or checkpoint that does not match the
    input's, or an output that holds a run with another configuration (without ``overwrite``).
    """
    import fsspec

    import ovsam
    from pipeline.annotate.ledger import Ledger, config_hash, write_run_json

    src_fs, src_root = fsspec.core.url_to_fs(cfg.input, **cfg.storage_options)
    dst_fs, dst_root = fsspec.core.url_to_fs(cfg.output, **cfg.storage_options)
    src_root, dst_root = src_root.rstrip("/"), dst_root.rstrip("/")
    if type(src_fs) is type(dst_fs) and src_root == dst_root:
        raise ValueError(f"--output {cfg.output} is the input; re-labelled shards go to a new output URL")
    src_ledger = Ledger(src_fs, src_root)
    source = _source_run(src_ledger, cfg.input)
    model = _build_model(cfg, source)
    vocabulary = ovsam.Vocabulary.resolve(cfg.vocabulary, model, progress=False)
    if vocabulary.clip_model != model.config.clip.name:
        raise ValueError(f"vocabulary {cfg.vocabulary!r} was embedded with CLIP {vocabulary.clip_model!r}, the input "
                         f"run's model uses {model.config.clip.name!r}; pass a class list or built-in name instead")
    top_k = cfg.top_k if cfg.top_k is not None else int(source["config"]["stage"].get("top_k", 5))
    top_k = min(top_k, len(vocabulary))
    hashed = hashed_config(source, cfg.vocabulary, vocabulary.content_hash, top_k)
    chash = config_hash(hashed)
    dst_ledger = Ledger(dst_fs, dst_root)
    dst_ledger.check_config(chash, hashed, overwrite=cfg.overwrite)

    manifests = src_ledger.manifests()
    committed = sorted(src_ledger.committed_shards(source["config_hash"]))
    done = dst_ledger.committed_shards(chash)
    pending = [s for s in committed if s not in done]
    print(f"[relabel] {len(committed)} committed input shards: {len(committed) - len(pending)} already relabelled, "
          f"{len(pending)} to process", flush=True)

    public = {k: v for k, v in asdict(cfg).items() if k != "storage_options"}
    # ``stage`` and ``inputs`` keep the shape of an annotate run.json, so `ovsam show` and a further relabel of
    # this output find the model and the original shards where they look for them.
    stage = {**source["config"]["stage"], "vocabulary": cfg.vocabulary, "top_k": top_k}
    if cfg.checkpoint is not None:
        stage["checkpoint"] = cfg.checkpoint
    config = {**public, "top_k": top_k, "stage": stage, "inputs": source["config"].get("inputs"),
              "max_pixels": source["config"].get("max_pixels")}
    write_run_json(dst_fs, dst_root, {
        "job": "relabel", "config": config, "hashed": hashed, "config_hash": chash,
        "source": {"output": cfg.input, "config_hash": source["config_hash"], "vocabulary": source.get("vocabulary"),
                   "hashed": source.get("hashed")},
        "vocabulary": vocabulary_record(vocabulary),
        "model_config": source["model_config"], "versions": package_versions(),
    })
    dst_ledger.cleanup_tmp()
    recognition = model.config.recognition
    del model

    summary = RelabelSummary(shards_skipped=len(committed) - len(pending))
    t0 = time.perf_counter()

    def one(shard: str) -> dict[str, Any]:
        return relabel_shard(src_fs, src_root, dst_fs, dst_root, manifests[shard], vocabulary, recognition, top_k,
                             chash)

    with ThreadPoolExecutor(max_workers=cfg.threads) as pool:
        futures = {shard: pool.submit(one, shard) for shard in pending}
        for shard, fut in futures.items():
            try:
                summary.per_shard.append(fut.result())
            except Exception as e:  # one unreadable shard must not lose the others' work
                logger.warning("relabel of shard %s failed: %s", shard, e)
                summary.failed[shard] = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    print(f"[relabel] done in {seconds:.1f}s: {len(summary.per_shard)} shards, {summary.instances} instances, "
          f"{summary.changed} with a new label name; vocabulary {len(vocabulary)} classes, top-k {top_k}")
    for name, err in summary.failed.items():
        print(f"[relabel] FAILED {name}: {err}", file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ovsam relabel", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run_relabel(config_from_args(args))
        return 1 if summary.failed else 0
    except UsageError as e:
        print(f"ovsam relabel: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"ovsam relabel: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
