"""Entrypoints: argparse -> config -> work. Every job module has ``main(argv: list[str] | None = None) -> int``.

``jobs.cli`` is the ``ovsam`` command; ``jobs.demo`` is ``make demo``.
"""
