"""Record formats: Arrow schemas of the annotation output (see ``schemas.annotation``)."""

from .annotation import (IMAGES_SCHEMA, INSTANCES_SCHEMA, SCHEMA_VERSION, STATUSES, images_table, instances_table,
                         schema_metadata)

__all__ = ["IMAGES_SCHEMA", "INSTANCES_SCHEMA", "SCHEMA_VERSION", "STATUSES", "images_table", "instances_table",
           "schema_metadata"]
