"""Suite-wide settings: the machines this runs on have 2 cores, every test starts from a known seed, and
torch.compile's kernel cache is kept apart per CPU-kernel setting."""

from __future__ import annotations

import getpass
import os
import random
import tempfile

import numpy as np
import pytest
import torch

torch.set_num_threads(2)

# Inductor's on-disk kernel cache does not tell kernels compiled under ATEN_CPU_CAPABILITY=avx2 (or
# ONEDNN_MAX_CPU_ISA) from the default ones, and a process that loads the other setting's kernels aborts. The suite
# runs under both settings on the same machine, so each setting gets its own cache (inherited by subprocesses).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _kernels = "-".join(os.environ.get(v, "default").lower() for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_ovsam_tests_{_kernels}")


@pytest.fixture
def seed() -> int:
    """Seed Python's, NumPy's and torch's global generators and return the seed."""
    value = 0
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance of 2 CPUs for the module's tests; ``address="local"`` starts one of our own even when
    other Ray instances run on this machine."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()
