"""The Ray Data annotation pipeline: shard sources -> stages -> Parquet sinks, plus the shard ledger.

Not implemented yet; see ARCHITECTURE.md for the design it is built to.
"""
