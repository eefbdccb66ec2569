"""``marval-rl evaluate``: sample N images per class and score them with the embedded evaluators.

Metrics: FID-proxy (Frechet distance on the embedded classifier's features against shipped reference
statistics of held-out renders) and classifier accuracy (the prompted class is the top-1 class).
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from marval_rl.sampling import sample_tokens


@torch.no_grad()
def generate_images(model, vae, labels: list[int], *, num_iter: int, cfg: float, cfg_schedule: str,
                    temperature: float, token_sampler, batch_size: int, seed: int,
                    progress: bool = True) -> tuple[torch.Tensor, float]:
    """Images in [0, 1] for ``labels`` (one per entry) and the seconds spent generating them."""
    generator = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for i in tqdm(range(0, len(labels), batch_size), desc="generating", disable=not progress):
        res = sample_tokens(model, labels=labels[i:i + batch_size], num_iter=num_iter, cfg=cfg,
                            cfg_schedule=cfg_schedule, temperature=temperature, generator=generator,
                            token_sampler=token_sampler, record_noise=False)
        out.append(vae.decode_images(res.tokens).cpu())
    return torch.cat(out), time.perf_counter() - t0


@torch.no_grad()
def score_images(images: torch.Tensor, labels: list[int], classifier, fid) -> dict:
    logits = torch.cat([classifier(images[i:i + 256]) for i in range(0, len(images), 256)])
    acc = (logits.argmax(1) == torch.tensor(labels)).float().mean().item()
    return {"fid_proxy": float(fid.score(images)), "classifier_acc": acc}


def format_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "---|" * len(columns)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([head, sep] + ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows])
