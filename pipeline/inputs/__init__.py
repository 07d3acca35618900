"""Inputs: where samples come from and how they are decoded. The lowest wing: imports no other wing.

- :mod:`.shard_bytes`: byte streams of (possibly compressed) tars, and what unknown bytes look like.
- :mod:`.shard_io`: ``ShardRef``, ``Sample``, ``ShardReadReport``, retrying opens and expected sample counts.
- :mod:`.tar_format`: tar headers, pax records and WebDataset member names.
- :mod:`.tar_reader`: ``ShardReader``, a streaming tar reader that reports damage instead of raising.
- :mod:`.image_files`: directories, globs and Parquet/CSV/JSONL lists of images as deterministic virtual shards.
- :mod:`.sources`: ``expand_shards`` (globs, brace ranges, list files, image inputs) and ``open_shard``.
- :mod:`.sidecar`: the ``json`` sidecar's prompts, parsed and validated.
- :mod:`.decode`: one sample -> an RGB image and its prompts, or a status with a reason.
- :mod:`.parquet`: whole-file Parquet reads into Arrow-owned buffers (used by every wing that reads Parquet).
"""
