"""The annotation pipeline, its inputs and outputs, training data, evaluation, exports and the server.

Wings by concern, each a package that imports only the wings listed above it (and ``ovsam``, ``schemas``):

- :mod:`pipeline.inputs`: shard and image-file sources, the tar reader, image and sidecar decoding, Parquet reading.
- :mod:`pipeline.annotate`: the annotation job: proposals, the model stage, the shard worker, the Ray driver, the
  ledger and sinks that commit each shard exactly once, and the readers of committed output.
- :mod:`pipeline.training`: packers (datasets -> training shards), training and distillation streams, the
  teacher cache and the synthetic world.
- :mod:`pipeline.evaluation`: ``ovsam eval``: the paper's prompt protocol, COCO AP, run comparison, HTML reports.
- :mod:`pipeline.export`: COCO export, the labelling tools' formats, overlays and the HTML gallery.
- :mod:`pipeline.serving`: ``ovsam serve``, the Ray Serve application.

``tests/test_house.py`` holds the order; only the modules that assemble Ray graphs import ray.
"""
