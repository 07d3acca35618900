"""Arrow schemas of the annotation output: the single source of truth for ``instances`` and ``images`` files.

Readers (pyarrow, DuckDB, pandas, polars) need nothing from this package: masks are COCO RLE structs, embeddings
float32 lists, and every file carries ``ovsam.schema_version`` and provenance in its key-value metadata.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import pyarrow as pa

SCHEMA_VERSION = "3"
STATUSES = ("ok", "decode_error", "bad_prompt", "no_prompts", "model_error")
#: ``prompt_type`` values: sidecar and whole-image boxes, points, grid points, and the ``--prompts`` source
#: (``detector:<name>``, ``proposals:<name>``) for boxes a detector or proposal head made
PROMPT_TYPES = ("box", "point", "grid", "detector:<name>", "proposals:<name>")

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

INSTANCES_SCHEMA = pa.schema([
    ("image_key", pa.string()),
    ("shard", pa.string()),
    ("instance_index", pa.int32()),
    ("prompt_type", pa.string()),
    ("prompt_box_xyxy", pa.list_(pa.float32())),
    ("prompt_points", pa.list_(pa.list_(pa.float32()))),
    ("prompt_point_labels", pa.list_(pa.int8())),
    ("box_xyxy", pa.list_(pa.float32())),
    ("mask_rle", RLE_TYPE),
    ("area", pa.int64()),
    ("mask_quality", pa.float32()),
    ("label", pa.int32()),
    ("label_name", pa.string()),
    ("label_score", pa.float32()),
    ("background_score", pa.float32()),
    ("topk_labels", pa.list_(pa.int32())),
    ("topk_scores", pa.list_(pa.float32())),
    ("detector_score", pa.float32()),
    ("detector_label", pa.string()),
    ("head_embedding", pa.list_(pa.float32())),
    ("clip_embedding", pa.list_(pa.float32())),
    ("clip_valid", pa.bool_()),
])

IMAGES_SCHEMA = pa.schema([
    ("image_key", pa.string()),
    ("shard", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("num_instances", pa.int32()),
    ("num_prompts", pa.int32()),
    ("num_prompts_dropped", pa.int32()),
    ("source_format", pa.string()),
    ("source_name", pa.string()),
])


def schema_metadata(provenance: dict[str, Any]) -> dict[bytes, bytes]:
    """Parquet key-value metadata: the schema version and a provenance JSON (config hash, shard, versions)."""
    return {b"ovsam.schema_version": SCHEMA_VERSION.encode(),
            b"ovsam.provenance": json.dumps(provenance, sort_keys=True).encode()}


def _table(rows: Iterable[dict[str, Any]], schema: pa.Schema, what: str) -> pa.Table:
    rows = list(rows)
    names = set(schema.names)
    for i, row in enumerate(rows):
        extra = set(row) - names
        missing = names - set(row)
        if extra or missing:
            raise ValueError(f"{what} row {i}: unknown columns {sorted(extra)}, missing columns {sorted(missing)}")
    return pa.Table.from_pylist(rows, schema=schema)


def instances_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Instance rows (dicts with exactly the schema's columns) -> a table with ``INSTANCES_SCHEMA``."""
    return _table(rows, INSTANCES_SCHEMA, "instances")


def images_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Image rows -> a table with ``IMAGES_SCHEMA``; ``status`` must be one of ``STATUSES``."""
    rows = list(rows)
    for i, row in enumerate(rows):
        if row.get("status") not in STATUSES:
            raise ValueError(f"images row {i} ({row.get('image_key')!r}): status {row.get('status')!r} is not one "
                             f"of {STATUSES}")
    return _table(rows, IMAGES_SCHEMA, "images")
