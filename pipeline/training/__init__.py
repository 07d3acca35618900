"""Training data: packers and the streams ``ovsam train`` and ``ovsam distill`` read. Imports
:mod:`pipeline.inputs` only.

- :mod:`.packers`: datasets -> WebDataset training shards, one module per source format, and the shard writer.
- :mod:`.train_specs`: ``--dataset`` / ``--heldout`` specs.
- :mod:`.train_data`: CLIP2SAM training streams: shard sets, augmentation, prompt sampling, held-out targets.
- :mod:`.distill_data`: SAM2CLIP distillation inputs and streams.
- :mod:`.teacher_cache`: cached teacher embeddings (``ovsam distill --dump-teacher``).
- :mod:`.synthetic`: the synthetic world of coloured shapes that the demo and the tests train on.
"""
