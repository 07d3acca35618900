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
import resource
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
n = 64 * 2**20 // 4  # 64 MiB: above glibc's largest mmap threshold
y = (torch.ones(n) * 2).sum().item()
start = faults()
for _ in range(5):  # allocated, written and freed again: reused pages do not fault
    torch.empty(n).fill_(1.0)
print(json.dumps({"before": before, "ok": ok, "again": again, "kept": rt.freed_memory_kept(), "y": y,
                  "faults": faults() - start}))
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
    faults = r.pop("faults")
    assert r == {"before": False, "ok": True, "again": True, "kept": True, "y": float(2 * 64 * 2**20 // 4)}
    # 5 fresh 64 MiB mappings would fault ~80,000 4 KiB pages; reused heap memory faults (almost) none
    assert faults < 2_000, faults


def test_environment_variable_turns_it_off() -> None:
    r = _probe("0")
    assert r["ok"] is False and r["kept"] is False and r["again"] is False
