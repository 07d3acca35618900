"""A least-recently-used cache bounded in bytes, with a time to live."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Generic, Hashable, TypeVar

import numpy as np

V = TypeVar("V")


def nbytes(value: Any) -> int:
    """Bytes held by tensors, arrays and bytes inside ``value`` (dataclasses, lists, tuples and dicts are walked)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(nbytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


@dataclass
class _Entry(Generic[V]):
    value: V
    size: int
    expires: float


class ByteLRU(Generic[V]):
    """``key -> value`` holding at most ``max_bytes`` (each value's size from ``sizeof``); the least recently used
    entries go first, and an entry unused for ``ttl_s`` seconds expires. A value larger than the whole bound is
    refused (``put`` returns False). Thread-safe. ``clock`` is ``time.monotonic`` unless a test passes its own."""

    def __init__(self, max_bytes: int, ttl_s: float, sizeof: Callable[[Any], int] = nbytes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_bytes < 1 or not ttl_s > 0:
            raise ValueError(f"max_bytes must be >= 1 and ttl_s > 0, got {max_bytes}, {ttl_s}")
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self._sizeof = sizeof
        self._clock = clock
        self._entries: OrderedDict[Hashable, _Entry[V]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            self._expire(self._clock())
            return key in self._entries

    def get(self, key: Hashable) -> V | None:
        """The value (now the most recently used, its TTL restarted), or None if absent or expired."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            entry.expires = now + self.ttl_s
            self._entries.move_to_end(key)
            return entry.value

    def put(self, key: Hashable, value: V, size: int | None = None) -> bool:
        size = self._sizeof(value) if size is None else int(size)
        with self._lock:
            now = self._clock()
            self._expire(now)
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.size
            if size > self.max_bytes:
                return False
            while self._entries and self.bytes + size > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.size
                self.evictions += 1
            self._entries[key] = _Entry(value, size, now + self.ttl_s)
            self.bytes += size
            return True

    def resize(self, key: Hashable, size: int) -> None:
        """Record that ``key``'s value now holds ``size`` bytes (it grew or shrank in place), evicting others to
        stay within the bound; the entry itself is dropped if it alone exceeds it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            self.bytes += int(size) - entry.size
            entry.size = int(size)
            self._entries.move_to_end(key)
            while self.bytes > self.max_bytes and self._entries:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.size
                self.evictions += 1

    def pop(self, key: Hashable) -> V | None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self.bytes -= entry.size
            return entry.value

    def _expire(self, now: float) -> None:
        # entries are in use order and each use restarts the TTL, so the expired ones are at the front
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                break
            del self._entries[key]
            self.bytes -= entry.size
            self.expirations += 1

    def stats(self) -> dict[str, int | float]:
        with self._lock:
            self._expire(self._clock())
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "ttl_s": self.ttl_s, "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                    "expirations": self.expirations}
