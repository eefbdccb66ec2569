import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
TINY_MAR = FIXTURES / "tiny_mar"


def golden(name: str):
    return torch.load(TINY_MAR / f"{name}.pt", weights_only=True)


def tiny_constructor() -> dict:
    return json.loads((TINY_MAR / "config.json").read_text())["constructor"]


@pytest.fixture(scope="session")
def tiny_mar():
    """The reference tiny MAR (official checkpoint format, 'model_ema' weights), eval mode."""
    from marval_rl.models import load_official_mar

    return load_official_mar(TINY_MAR / "checkpoint.pth", tiny_constructor())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core CPU: intra-op threads only thrash (measured 2-3x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
