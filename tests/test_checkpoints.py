"""Loading and saving: official files, the project's safetensors format, and every way they go wrong."""
import os
import pickle

import pytest
import torch

from conftest import TINY_MAR, tiny_constructor
from marval_rl.models import (MAR, AutoencoderKL, CheckpointError, VAEConfig, load_official_mar,
                              load_official_vae, load_pretrained, save_pretrained)


def test_factory_name_config_is_accepted(tmp_path):
    """The official loader takes a factory name; a tiny file then fails with a clear mismatch list."""
    with pytest.raises(CheckpointError) as e:
        load_official_mar(TINY_MAR / "checkpoint.pth", "mar_base")
    msg = str(e.value)
    assert "another architecture" in msg and "shape mismatches" in msg and "missing keys" in msg
    assert "encoder_blocks.2.norm1.weight" in msg  # B has 12 blocks, the tiny model 2


def test_wrong_architecture_never_half_loads(tiny_mar):
    cfg = {**tiny_constructor(), "diffloss_w": 32}
    sd = torch.load(TINY_MAR / "checkpoint.pth", weights_only=True)["model_ema"]
    model = MAR(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from marval_rl.models.checkpoints import load_state_dict_strict
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_dict_strict(model, sd, "tiny")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed load"


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_official_mar(tmp_path / "nope.pth", tiny_constructor())
    data = (TINY_MAR / "checkpoint.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_official_mar(cut, tiny_constructor())
    with pytest.raises(CheckpointError, match="no 'model_ema'"):
        torch.save({"model": {}}, tmp_path / "x.pth")
        load_official_mar(tmp_path / "x.pth", tiny_constructor())


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_payload_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"model_ema": {}, "x": payload}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_official_mar(path, tiny_constructor())
    assert not marker.exists()


def test_official_file_with_args_namespace_loads(tmp_path):
    """Released checkpoints may carry argparse args; that one class is allow-listed."""
    import argparse

    ckpt = torch.load(TINY_MAR / "checkpoint.pth", weights_only=True)
    ckpt["args"] = argparse.Namespace(model="mar_base", diffloss_d=6, lr=1e-4)
    torch.save(ckpt, tmp_path / "with_args.pth")
    model = load_official_mar(tmp_path / "with_args.pth", tiny_constructor())
    assert isinstance(model, MAR) and not model.training


def test_safetensors_roundtrip_and_architecture_check(tmp_path, tiny_mar):
    save_pretrained(tiny_mar, tmp_path / "mar", metadata={"note": "tiny"})
    assert sorted(os.listdir(tmp_path / "mar")) == ["config.json", "model.safetensors"]
    again = load_pretrained(tmp_path / "mar", expected="mar")
    assert again.config == tiny_mar.config
    for k, v in tiny_mar.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    with pytest.raises(CheckpointError, match="'mar' checkpoint, but a 'vae' is expected"):
        load_pretrained(tmp_path / "mar", expected="vae")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(tmp_path, expected="mar")
    (tmp_path / "mar" / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(tmp_path / "mar")


def test_official_vae_loader(tmp_path):
    cfg = VAEConfig(ch=32, ch_mult=(1, 2), num_groups=8, attn_resolutions=())
    vae = AutoencoderKL(cfg)
    torch.save({"model": vae.state_dict()}, tmp_path / "kl.ckpt")
    again = load_official_vae(tmp_path / "kl.ckpt", cfg.to_dict())
    for k, v in vae.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    with pytest.raises(CheckpointError, match="another architecture"):
        load_official_vae(tmp_path / "kl.ckpt")  # default = full KL-16
    # a MAR file given where a VAE is expected
    with pytest.raises(CheckpointError, match="another architecture"):
        load_official_vae(TINY_MAR / "checkpoint.pth", cfg.to_dict())
