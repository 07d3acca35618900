"""Record formats: the Arrow schemas of the annotation output (``schemas.annotation``) and the training shard
format (``schemas.training``). Imports nothing else of the project."""

from .annotation import (IMAGES_SCHEMA, INSTANCES_SCHEMA, SCHEMA_VERSION, STATUSES, images_table, instances_table,
                         schema_metadata)

__all__ = ["IMAGES_SCHEMA", "INSTANCES_SCHEMA", "SCHEMA_VERSION", "STATUSES", "images_table", "instances_table",
           "schema_metadata"]
