"""Fixtures; the shared helpers live in helpers.py."""
import os

import pytest


@pytest.fixture(scope="session")
def torch():
    """torch, the external oracle. CI sets FASTLSTM_REQUIRE_TORCH=1 so that a
    missing torch fails the run instead of skipping the oracle tests."""
    if os.environ.get("FASTLSTM_REQUIRE_TORCH", "0") not in ("", "0"):
        import torch
    else:
        torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch
