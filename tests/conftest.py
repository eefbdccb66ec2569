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


def make_tiny_policy_dirs(root: Path) -> Path:
    """``root/student`` (MARVAL from the tiny MAR), ``root/teacher`` and ``root/vae`` (a random 64 px KL VAE,
    seed 0): the smallest real pipeline, for RL, Ray and bad-input tests."""
    from marval_rl.models import AutoencoderKL, VAEConfig, load_official_mar, save_pretrained
    from marval_rl.models.one_step import MARVAL

    teacher = load_official_mar(TINY_MAR / "checkpoint.pth", tiny_constructor())
    save_pretrained(MARVAL.from_teacher(teacher), root / "student")
    save_pretrained(teacher, root / "teacher")
    torch.manual_seed(0)
    save_pretrained(AutoencoderKL(VAEConfig(ch=16, ch_mult=(1, 1, 1, 1, 1), num_groups=8, attn_resolutions=(),
                                            resolution=64)), root / "vae")
    return root


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
