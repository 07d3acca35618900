"""Parquet reads that are safe at interpreter exit: a file's bytes are read whole in one request, copied into an
Arrow-owned buffer and decoded by ``ParquetFile``. Every wing that reads Parquet (URL lists, outputs, exports,
evaluation) uses these.
"""

from __future__ import annotations

from typing import Any



def arrow_buffer(data: bytes) -> Any:
    """``data`` copied into a buffer that Arrow allocated and owns.

    Hand pyarrow's readers this, never a Python object (``bytes``, ``io.BytesIO``, an fsspec file). Arrow wraps a
    Python object in a ``PyBuffer`` (or reads a Python file through calls that return them), and a reader's
    thread pools can drop the last reference to one after the read has returned: ``pq.read_table`` scans through
    Arrow's dataset layer, whose fragments and pre-buffered reads are released on Arrow's IO and CPU threads. When
    that happens while the interpreter finalises, the destructor's ``PyGILState_Ensure`` ends the thread inside a
    C++ destructor and the process aborts ("terminate called without an active exception", exit 134) after all
    its work is done. An Arrow-owned buffer is freed without the GIL, on any thread."""
    import numpy as np
    import pyarrow as pa

    buf = pa.allocate_buffer(len(data))
    np.frombuffer(buf, dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
    return buf


def parquet_from_bytes(data: bytes, columns: list[str] | None = None) -> Any:
    """A Parquet file's table, decoded from its bytes by ``ParquetFile`` (no dataset layer, no pre-buffering) over
    an Arrow-owned copy of them (see ``arrow_buffer``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.ParquetFile(pa.BufferReader(arrow_buffer(data))).read(columns=columns)


def read_parquet(fs: Any, path: str, columns: list[str] | None = None) -> Any:
    """The table of the Parquet file at ``path`` on ``fs``, read whole in one request (see ``parquet_from_bytes``)."""
    with fs.open(path, "rb") as f:
        data = f.read()
    return parquet_from_bytes(data, columns)


