"""Packers: public dataset formats -> WebDataset training shards (``ovsam pack``; format: ``schemas/training.py``).

Each ``plan_*`` function reads a source's metadata once (an annotation JSON, a folder listing) and returns a
:class:`~pipeline.training.packers.writer.PackPlan`: the classes, the settings, the items in a deterministic order and a
``load`` function that reads one item's image (never re-encoded) and builds its sidecar. ``pack_*`` functions plan
and write (:func:`~pipeline.training.packers.writer.write_plan`: streaming, resumable, sharded by count and/or bytes).

- :func:`plan_coco`: COCO / LVIS instances JSON + image folder; masks (polygons, RLE) as compressed RLE; crowd
  annotations left out; optional base-only filtering (LVIS: rare = novel; COCO: the built-in 48/17 split).
- :func:`plan_detection`: COCO-style detection JSON (Objects365, V3Det): boxes and labels.
- :func:`plan_folders`: ``root/<class folder>/<image>`` (ImageNet-21k/22k), class names from WordNet ids.
- :func:`plan_sa1b`: SA-1B (``sa_N.jpg`` + ``sa_N.json``), class-agnostic masks.
- :func:`pack_synthetic`: the synthetic world of ``pipeline/training/synthetic.py``, a train and a held-out shard set.

Every path or URL is opened with fsspec; ``storage_options`` apply to inputs and output alike.
"""
