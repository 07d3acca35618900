"""Which shards are done, and whether an output directory belongs to this job's configuration."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pipeline.annotate.sinks import scrub

logger = logging.getLogger(__name__)


def config_hash(hashed: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the result-changing settings (see ``jobs.annotate.hashed_config``)."""
    from schemas import SCHEMA_VERSION

    return hashlib.sha256(json.dumps({**hashed, "schema_version": SCHEMA_VERSION}, sort_keys=True).encode()).hexdigest()


def write_run_json(fs: Any, root: str, record: dict[str, Any]) -> None:
    """``run.json`` at the output root (credential-like entries removed), written via a temporary name."""
    root = root.rstrip("/")
    fs.makedirs(f"{root}/_tmp", exist_ok=True)
    tmp = f"{root}/_tmp/run.json"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(scrub(record), indent=1, sort_keys=True, default=str).encode())
    fs.mv(tmp, f"{root}/run.json")


class Ledger:
    """The committed state of one output root."""

    def __init__(self, fs: Any, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def forget_listings(self) -> None:
        """Drop directory listings the filesystem cached under the root. Workers in other processes commit shards,
        and s3fs keeps listings for the life of the (shared, cached) filesystem instance, so a listing taken by an
        earlier run in this process would hide their commits and get committed shards redone."""
        for d in ("", "/_manifest", "/instances", "/images", "/_tmp"):
            self.fs.invalidate_cache(f"{self.root}{d}")

    def run_record(self) -> dict[str, Any] | None:
        self.forget_listings()
        path = f"{self.root}/run.json"
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def check_config(self, chash: str, hashed: dict[str, Any], *, overwrite: bool = False) -> None:
        """Refuse to mix runs: an existing ``run.json`` with another config hash raises ``ValueError`` naming the
        settings that differ, unless ``overwrite`` (which deletes the old run's files)."""
        record = self.run_record()
        if record is None or record.get("config_hash") == chash:
            return
        old = record.get("hashed", {})
        diff = sorted(k for k in set(old) | set(hashed) if old.get(k) != hashed.get(k))
        if not overwrite:
            details = ", ".join(f"{k}: {old.get(k)!r} -> {hashed.get(k)!r}" for k in diff)
            raise ValueError(f"{self.root} holds a run with another configuration ({details}); use a new --output "
                             "or pass --overwrite to discard the old run")
        logger.warning("discarding the run in %s (changed: %s)", self.root, ", ".join(diff))
        for d in ("instances", "images", "_manifest", "_tmp"):
            if self.fs.exists(f"{self.root}/{d}"):
                self.fs.rm(f"{self.root}/{d}", recursive=True)

    def manifests(self) -> dict[str, dict[str, Any]]:
        self.forget_listings()
        out = {}
        for path in self.fs.glob(f"{self.root}/_manifest/*.json"):
            with self.fs.open(path, "rb") as f:
                m = json.loads(f.read())
            out[m["shard"]] = m
        return out

    def committed_shards(self, chash: str) -> set[str]:
        """Shards whose manifest matches ``chash`` and whose files exist with the recorded sizes."""
        done = set()
        for shard, m in self.manifests().items():
            if m.get("config_hash") != chash:
                continue
            ok = all(self.fs.exists(f"{self.root}/{f['path']}") and self.fs.size(f"{self.root}/{f['path']}") ==
                     f["bytes"] for f in m["files"].values())
            if ok:
                done.add(shard)
            else:
                logger.warning("shard %s has a manifest but its files do not match it; it will be redone", shard)
        return done

    def cleanup_tmp(self) -> None:
        """Remove files left in ``_tmp/`` by killed runs. A worker of a killed driver may still be moving one of
        them into place while this runs: a file gone since the listing is not an error."""
        self.forget_listings()
        if self.fs.exists(f"{self.root}/_tmp"):
            for path in self.fs.ls(f"{self.root}/_tmp", detail=False):
                try:
                    self.fs.rm(path)
                except FileNotFoundError:
                    pass

    def remove_empty_tmp(self) -> None:
        """Remove ``_tmp/`` once a run is over and nothing is left in it (object stores have no empty folders)."""
        self.forget_listings()
        tmp = f"{self.root}/_tmp"
        try:
            if self.fs.isdir(tmp) and not self.fs.ls(tmp, detail=False):
                self.fs.rmdir(tmp)
        except (OSError, NotImplementedError):  # a concurrent writer, or a store without folders
            pass
