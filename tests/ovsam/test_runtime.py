"""ovsam.runtime.keep_freed_memory: large blocks come from malloc's heap and are reused, in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
import torch
import ovsam.runtime as rt
before = rt.freed_memory_kept()
ok = rt.keep_freed_memory()
again = rt.keep_freed_memory()
import ctypes
class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
n = 64 * 2**20 // 4  # 64 MiB: above glibc's largest mmap threshold
y = (torch.ones(n) * 2).sum().item()
x = torch.empty(n).fill_(1.0)
alive = libc.mallinfo2()
del x
freed = libc.mallinfo2()
print(json.dumps({"before": before, "ok": ok, "again": again, "kept": rt.freed_memory_kept(), "y": y,
                  "mmapped_alive": alive.hblkhd, "heap_after_free": freed.arena}))
"""


def _probe(env_value: str | None) -> dict:
    env = dict(os.environ)
    env.pop("OVSAM_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["OVSAM_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_applies_once_and_tensors_still_work() -> None:
    r = _probe(None)
    mmapped, heap = r.pop("mmapped_alive"), r.pop("heap_after_free")
    assert r == {"before": False, "ok": True, "again": True, "kept": True, "y": float(2 * 64 * 2**20 // 4)}
    assert mmapped < 64 * 2**20  # the 64 MiB tensor came from the heap, not from a fresh mapping
    default = _probe("0")
    assert default["mmapped_alive"] >= 64 * 2**20  # glibc's own choice: a mapping, unmapped again on free
    assert heap >= default["heap_after_free"] + 64 * 2**20  # the freed blocks stay in the heap for the next one


def test_environment_variable_turns_it_off() -> None:
    r = _probe("0")
    assert r["ok"] is False and r["kept"] is False and r["again"] is False
