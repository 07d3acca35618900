"""Benchmarks: `python bench/pipeline.py --help`."""
