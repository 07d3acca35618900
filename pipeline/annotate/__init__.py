"""Annotate: the ``ovsam annotate`` job. Imports :mod:`pipeline.inputs` only.

- :mod:`.proposals`: prompt modes (sidecar boxes, torchvision detectors, grid, whole image).
- :mod:`.stages`: ``Annotator``, the model stage: prompts -> masks, labels, scores and rows (plain Python).
- :mod:`.masks`: masks as the rows store them (COCO RLE, areas).
- :mod:`.relabel`: new labels for stored instance rows from their region embeddings.
- :mod:`.worker`: ``ShardWorker``: read, decode, model and write one shard on overlapping threads.
- :mod:`.run`: the Ray driver: cluster plan, actors, progress and the run summary.
- :mod:`.sinks`: Parquet and manifest commits, atomic and exactly once per shard.
- :mod:`.ledger`: which shards are committed under which config hash; ``run.json``.
- :mod:`.outputs`: reading committed output back: the shards' tables, ``run.json``, image file names and the
  source images an output was made from.
"""
