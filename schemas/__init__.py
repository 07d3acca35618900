"""Record formats: Arrow schemas and dataclasses for annotation output, shard manifests and training samples.

Not implemented yet; see ARCHITECTURE.md for the design it is built to.
"""
