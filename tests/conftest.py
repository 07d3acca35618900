"""Suite-wide settings: the machines this runs on have 2 cores, and every test starts from a known seed."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def seed() -> int:
    """Seed Python's, NumPy's and torch's global generators and return the seed."""
    value = 0
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value
