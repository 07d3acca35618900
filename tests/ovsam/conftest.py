from __future__ import annotations

import pytest
import torch

from ovsam import build_ovsam

from .utils import randomize_


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return randomize_(build_ovsam("ovsam-tiny"), seed=11, scale=0.3).eval()


@pytest.fixture(scope="session")
def tiny_vocab(tiny_model):
    from ovsam import Vocabulary

    return Vocabulary.from_names(["red square", "blue circle", "green triangle,green tri", "yellow star"],
                                 tiny_model, progress=False)
