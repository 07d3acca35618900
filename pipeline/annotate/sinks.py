"""Per-shard output: Parquet files written under temporary names, moved into place, then the manifest last.

Layout under the output root: ``instances/<shard>.parquet``, ``images/<shard>.parquet``,
``_manifest/<shard>.json`` (the commit point), ``run.json``, and ``_tmp/`` for files being written. Object-store
PUTs are atomic, and local moves are renames, so a reader never sees a partial file; a shard is committed iff its
manifest exists.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Any

SECRET_WORDS = ("key", "secret", "token", "password", "credential", "session")


def scrub(obj: Any) -> Any:
    """Drop credential-like entries (any key containing key/secret/token/password/credential/session)."""
    if isinstance(obj, dict):
        return {k: scrub(v) for k, v in obj.items()
                if not any(w in str(k).lower() for w in SECRET_WORDS) or str(k).lower() in ("top_k", "image_key")}
    if isinstance(obj, (list, tuple)):
        return [scrub(v) for v in obj]
    return obj


def _put(fs: Any, tmp: str, final: str, data: bytes) -> None:
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, final)


_TMP_SUFFIXES = (".instances.parquet", ".images.parquet", ".manifest.json")


def _remove_stale_tmp(fs: Any, root: str, shard: str) -> None:
    """Remove ``_tmp`` files of earlier attempts at ``shard`` (``<shard>.<attempt>.<kind>``): an attempt killed
    between writing a file and moving it leaves one, and otherwise only the next run's start would remove it. An
    attempt still alive (a worker of a killed driver) then fails at its move and commits nothing more."""
    fs.invalidate_cache(f"{root}/_tmp")
    try:
        listing = fs.ls(f"{root}/_tmp", detail=False)
    except FileNotFoundError:  # an object store has no empty directories
        return
    for path in listing:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        stem = next((name[: -len(s)] for s in _TMP_SUFFIXES if name.endswith(s)), None)
        if stem is not None and stem.rpartition(".")[0] == shard:
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass


def _parquet_bytes(table: Any, provenance: dict[str, Any]) -> bytes:
    import pyarrow.parquet as pq

    from schemas import schema_metadata

    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **schema_metadata(provenance)})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()








def warm_up(instance_rows: list[dict[str, Any]], image_rows: list[dict[str, Any]]) -> None:
    """Build and encode (in memory, nothing written) the tables of throw-away rows, so that the first shard's
    commit does not pay pyarrow's first-call costs (~0.2 s)."""
    from schemas import images_table, instances_table

    _parquet_bytes(instances_table(instance_rows), {})
    _parquet_bytes(images_table(image_rows), {})


def commit_shard(
    fs: Any,
    root: str,
    shard: str,
    instance_rows: list[dict[str, Any]],
    image_rows: list[dict[str, Any]],
    *,
    input_url: str,
    config_hash: str,
    read_report: Any,
    attempt_id: str,
) -> dict[str, Any]:
    """Write and commit one shard; returns the manifest. The manifest is written last."""
    from schemas import SCHEMA_VERSION, images_table, instances_table

    root = root.rstrip("/")
    for d in ("instances", "images", "_manifest", "_tmp"):
        fs.makedirs(f"{root}/{d}", exist_ok=True)
    _remove_stale_tmp(fs, root, shard)
    provenance = {"shard": shard, "input_url": input_url, "config_hash": config_hash}
    files = {}
    for kind, table in (("instances", instances_table(instance_rows)), ("images", images_table(image_rows))):
        data = _parquet_bytes(table, provenance)
        final = f"{root}/{kind}/{shard}.parquet"
        _put(fs, f"{root}/_tmp/{shard}.{attempt_id}.{kind}.parquet", final, data)
        files[kind] = {"path": f"{kind}/{shard}.parquet", "rows": table.num_rows, "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()}
    statuses: dict[str, int] = {}
    for row in image_rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    manifest = {
        "shard": shard, "input_url": input_url, "schema_version": SCHEMA_VERSION, "config_hash": config_hash,
        "samples_read": None if read_report is None else read_report.samples_read,
        "samples_expected": None if read_report is None else read_report.expected,
        "truncated": bool(read_report is not None and read_report.truncated),
        "read_error": None if read_report is None else read_report.error,
        "read_problems": [] if read_report is None else list(read_report.problems),
        "statuses": statuses, "files": files, "attempt_id": attempt_id, "committed_at": time.time(),
    }
    _put(fs, f"{root}/_tmp/{shard}.{attempt_id}.manifest.json", f"{root}/_manifest/{shard}.json",
         json.dumps(scrub(manifest), indent=1, sort_keys=True).encode())
    return manifest
