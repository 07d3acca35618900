"""Reading committed Parquet never aborts the process at exit.

``pq.read_table`` over a Python file object (an fsspec file, ``io.BytesIO``) or over ``bytes`` lets Arrow's thread
pools release a Python-owned buffer after the read returned; when that happens while the interpreter finalises,
the process dies with "terminate called without an active exception" (exit 134) after its work is done. Measured
with the script below on 2 cores: 8 of 60 short processes aborted that way when idle, 50 of 200 under CPU load.
``pipeline.inputs.parquet.read_parquet`` (every reader of committed output goes through it) must never do so.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.inputs.parquet import arrow_buffer, parquet_from_bytes

ROOT = Path(__file__).resolve().parents[3]

_READ_AND_EXIT = """
import sys
sys.path.insert(0, {root!r})
import fsspec
from pipeline.inputs.parquet import read_parquet
fs = fsspec.filesystem("file")
for _ in range(3):
    table = read_parquet(fs, {path!r}, columns=["key", "value"])
assert table.num_rows == 2000, table.num_rows
"""


def _table(n: int = 2000) -> pa.Table:
    return pa.table({"key": [f"key{i}" for i in range(n)], "value": np.arange(n),
                     "blob": [b"x" * 50] * n})


def test_processes_that_read_parquet_exit_cleanly(tmp_path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(_table(), path, compression="zstd")
    script = _READ_AND_EXIT.format(root=str(ROOT), path=str(path))

    def run(_: int) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        return proc.returncode, proc.stderr[-300:]

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, range(40)))
    failed = [(rc, err) for rc, err in results if rc != 0]
    assert not failed, f"{len(failed)} of 40 exited non-zero, e.g. {failed[0]}"


def test_parquet_from_bytes_reads_columns_and_keeps_no_python_object() -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(_table(10), buf)
    data = buf.getvalue().to_pybytes()
    before = sys.getrefcount(data)
    table = parquet_from_bytes(data, columns=["key", "blob"])
    owned = arrow_buffer(data)
    assert sys.getrefcount(data) == before  # neither the table nor the copy refers to the caller's bytes
    assert table.column_names == ["key", "blob"] and table.column("key").to_pylist()[3] == "key3"
    assert owned.to_pybytes() == data
    wrapped = pa.py_buffer(data)  # what pyarrow does with bytes: it holds on to them
    assert sys.getrefcount(data) == before + 1
    del wrapped
    assert parquet_from_bytes(data).equals(_table(10))
