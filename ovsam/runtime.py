"""Process-level settings for running the model on CPU.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves blocks above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and unmaps them on free, so every large activation (a 1024 x 1024 image's feature maps
and MLP hiddens are 40-170 MB) is page-faulted in again on every call. On a 2-core machine that kernel time was
a third of the SAM2CLIP neck's wall time. :func:`keep_freed_memory` makes malloc take large blocks from its heap
and keep freed memory for reuse; a process that runs the model repeatedly then holds its peak working set
instead of returning it to the system between calls. :func:`release_freed_memory` does the opposite, once: it
hands the heap's free memory back to the system (a server that evicts cached features calls it after evicting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_ENV = "OVSAM_KEEP_FREED_MEMORY"
_applied: bool | None = None
_libc_handle: ctypes.CDLL | None | bool = None


def _libc() -> ctypes.CDLL | None:
    """glibc, or None off Linux or where the C library is not glibc (musl has no mallopt or malloc_trim)."""
    global _libc_handle
    if _libc_handle is None:
        _libc_handle = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.mallopt.restype = ctypes.c_int
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.malloc_trim.restype = ctypes.c_int
                _libc_handle = lib
            except (OSError, AttributeError):
                pass
    return _libc_handle or None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from the heap and not to trim it (once per process).

    Returns whether the setting is in effect. A no-op (False) off Linux/glibc and when the environment variable
    ``OVSAM_KEEP_FREED_MEMORY`` is ``0``. Affects allocations made after the call only.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not ok:
        logger.debug("mallopt refused the settings; the allocator is left as it was")
    _applied = ok
    return ok


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process."""
    return bool(_applied)


def release_freed_memory() -> None:
    """Give the memory free in malloc's heap back to the system now (glibc's ``malloc_trim``; elsewhere a no-op).
    Blocks of a few MB freed and allocated in turn otherwise stay in the heap, and a long-running process that
    keeps a bounded cache of them creeps above its bound."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


__all__ = ["freed_memory_kept", "keep_freed_memory", "release_freed_memory"]
