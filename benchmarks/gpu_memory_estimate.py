"""Parameter counts of MAR-B/L/H and MARVAL-B/L/H, and the activation memory autograd keeps per sample,
for docs/gpu.md's memory ESTIMATES (computed on CPU; not a GPU measurement).

    python benchmarks/gpu_memory_estimate.py                 # counts + activations, B, L, H (a few minutes)
    python benchmarks/gpu_memory_estimate.py --counts-only   # parameter counts only (seconds: meta device)

Counts: the models built with random weights on the meta device, every parameter counted. Activations:
the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``, each storage once), fp32,
one sample, for the pieces of an RL reward-gradient update and of a GSIM step:

* ``ar_step``: one AR step's backbone pass (class embedding trainable, so the whole backbone graph is
  kept) + the one-step head on the 24 tokens a late step unmasks, with and without the backbone's
  activation checkpointing (``train.grad_checkpointing``);
* ``head_token``: one diffusion-head (SimpleMLPAdaLN) pass per token, the unit of a GSIM step;
* ``vae_decode``: KL-16's decoder, 16x16x16 latents -> a 256 px image;
* ``reward_<tower>``: an open_clip image tower at 224 px (ViT-B-32: clip_score; ViT-L-16: the size of
  ImageReward's BLIP ViT-L/16; ViT-H-14: PickScore's CLIP-H/14); text towers run without grad.

The allocator's overhead, temporaries freed inside an op and cuDNN workspaces are not counted, so a GPU
measures more (benchmarks/gpu_check.sh reports peak memory on a GPU).
"""
from __future__ import annotations

import argparse
import json

import torch

SIZES = ("mar_base", "mar_large", "mar_huge")


def _count(module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


def counts() -> dict:
    from marval_rl.models.mar import MAR
    from marval_rl.models.one_step import MARVAL, MARVALConfig

    out = {}
    for name in SIZES:
        with torch.device("meta"):
            teacher = MAR(name)
            student = MARVAL(MARVALConfig(mar=teacher.config.to_dict()))
        head = _count(teacher, "diffloss.")
        out[name] = {"teacher": _count(teacher), "head": head, "backbone": _count(teacher) - head,
                     "class_emb": _count(teacher, "class_emb."), "student": _count(student),
                     "student_head": _count(student, "one_step.")}
    return out


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def activations(name: str) -> dict:
    from marval_rl.models.mar import MAR
    from marval_rl.models.one_step import MARVAL, MARVALConfig

    torch.manual_seed(0)
    teacher = MAR(name)
    student = MARVAL(MARVALConfig(mar=teacher.config.to_dict()))
    del teacher
    student.requires_grad_(False)
    student.class_emb.requires_grad_(True)
    student.one_step.requires_grad_(True)
    L, C = student.seq_len, student.token_embed_dim
    tokens, mask = torch.randn(1, L, C), torch.zeros(1, L)
    mask[0, :24] = 1                                          # a late AR step: 24 tokens left to draw
    labels = torch.tensor([3])

    def step():
        z = student.condition(tokens, mask, labels)
        zi = z[mask.bool()]
        student.one_step(torch.randn(zi.shape[0], C), zi).sum().backward()

    out = {}
    for ckpt in (False, True):
        student.config.grad_checkpointing = ckpt
        out[f"ar_step{'_ckpt' if ckpt else ''}"] = saved_bytes(step)
    student.one_step.requires_grad_(True)
    zs = torch.randn(256, student.config.decoder_embed_dim)
    out["head_token"] = saved_bytes(lambda: student.one_step(torch.randn(256, C), zs).sum().backward()) / 256
    return out


def shared_activations() -> dict:
    import open_clip

    from marval_rl.models.vae import AutoencoderKL, kl16_config

    vae = AutoencoderKL(kl16_config()).requires_grad_(False)
    lat = torch.randn(1, 16, 16, 16, requires_grad=True)
    out = {"vae_decode": saved_bytes(lambda: vae.decode(lat).sum().backward())}
    del vae
    for tower in ("ViT-B-32", "ViT-L-16", "ViT-H-14"):
        model = open_clip.create_model(tower).requires_grad_(False)
        img = torch.randn(1, 3, 224, 224, requires_grad=True)
        out[f"reward_{tower}"] = saved_bytes(lambda: model.encode_image(img).sum().backward())
        del model
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts-only", action="store_true")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"params": counts()}
    if not args.counts_only:
        result["activations_bytes_per_sample"] = {n: activations(n) for n in args.sizes}
        result["activations_bytes_per_sample"]["shared"] = shared_activations()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
