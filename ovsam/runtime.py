"""Process-level settings for running the model on CPU.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves blocks above its mmap threshold (at most
32 MiB) with a fresh ``mmap`` and unmaps them on free, so every large activation (a 1024 x 1024 image's feature maps
and MLP hiddens are 40-170 MB) is page-faulted in again on every call. On a 2-core machine that kernel time was
a third of the SAM2CLIP neck's wall time. :func:`keep_freed_memory` makes malloc take large blocks from its heap
and keep freed memory for reuse; a process that runs the model repeatedly then holds its peak working set
instead of returning it to the system between calls.
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
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not ok:
        logger.debug("mallopt refused the settings; the allocator is left as it was")
    _applied = ok
    return ok


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` is in effect in this process."""
    return bool(_applied)


__all__ = ["freed_memory_kept", "keep_freed_memory"]
