"""The AR unmasking loop: one loop for every token sampler (100-step diffusion chain, one-step head).

Generation starts with every token masked. At step k of K the backbone computes a condition z_i for
every position, the cosine schedule decides how many tokens stay masked after this step, and the
token sampler draws the tokens that become visible now (the *end* of each random order first).
With CFG the backbone also runs on the null class and the token sampler combines both conditions.

Every random draw goes through a :class:`RandomStream`, which records it. Passing the returned
:class:`SampleRecord` back as ``replay=`` reproduces the trajectory exactly, also with gradients on
(the RL trainer recomputes rollouts this way). Given ``orders`` and a CPU ``torch.Generator``, the
draws happen in the official MAR order, so the reference goldens reproduce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from marval_rl.models.head import DiffusionSampler  # noqa: F401  (the teacher's token sampler; re-exported)


class RandomStream:
    """Source of every Gaussian draw of one generation: fresh (recorded) or replayed from a record."""

    def __init__(self, generator: torch.Generator | None, device: torch.device,
                 replay: list[list[torch.Tensor]] | None = None, record: bool = True):
        self.generator, self.device, self.record = generator, device, record
        self._replay = replay
        self.steps: list[list[torch.Tensor]] = []

    def begin_step(self, step: int):
        self._step, self._i = step, 0
        self.steps.append([])

    def randn(self, shape) -> torch.Tensor:
        shape = tuple(shape)
        if self._replay is not None:
            draws = self._replay[self._step]
            if self._i >= len(draws) or tuple(draws[self._i].shape) != shape:
                got = tuple(draws[self._i].shape) if self._i < len(draws) else "nothing"
                raise ValueError(f"replay record does not match this generation: step {self._step} "
                                 f"draw {self._i} expected shape {shape}, record has {got}")
            x = draws[self._i].to(self.device)
        elif self.generator is not None:
            x = torch.randn(shape, generator=self.generator, device=self.generator.device).to(self.device)
        else:
            x = torch.randn(shape, device=self.device)
        self._i += 1
        if self.record:
            self.steps[-1].append(x.detach())
        return x


class TokenSampler(Protocol):
    """Draws tokens [N, C] given conditions z_cond [N, D] (and z_uncond [N, D] when cfg != 1)."""

    def __call__(self, z_cond: torch.Tensor, z_uncond: torch.Tensor | None, cfg: float,
                 temperature: float, randn: Callable[[tuple], torch.Tensor]) -> torch.Tensor: ...


@dataclass
class SampleRecord:
    """Everything random about one generation; replaying it reproduces the tokens exactly."""

    orders: torch.Tensor                       # [B, L] int64
    labels: torch.Tensor | None                # [B] int64, or None for the null class
    num_iter: int
    cfg: float
    cfg_schedule: str
    temperature: float
    noise: list[list[torch.Tensor]] = field(default_factory=list)   # per AR step, draws in order
    predicted: list[torch.Tensor] = field(default_factory=list)     # per AR step, [B, L] bool
    cfg_per_step: list[float] = field(default_factory=list)


@dataclass
class SampleResult:
    tokens: torch.Tensor          # [B, C, h, w] latents in MAR's scaled space
    record: SampleRecord

    @property
    def rows_per_step(self) -> list[int]:
        return [int(p.sum()) for p in self.record.predicted]


def mask_len_after_step(step: int, num_iter: int, seq_len: int, num_masked: int) -> int:
    """Tokens still masked after ``step``: cosine schedule, at least one predicted, one kept masked."""
    ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)  # np.cos as the official code (ulp-exact)
    return int(max(1, min(num_masked - 1, np.floor(seq_len * ratio))))


def cfg_at_step(cfg: float, schedule: str, mask_len: int, seq_len: int) -> float:
    """MAR's guidance at one AR step; "linear" uses the post-step mask length (float32 like upstream)."""
    if schedule == "constant":
        return float(cfg)
    ml = torch.tensor([float(mask_len)], dtype=torch.float32)
    return float((1 + (cfg - 1) * (seq_len - ml) / seq_len)[0])


def sample_tokens(model, bsz: int | None = None, labels=None, num_iter: int = 64, cfg: float = 1.0,
                  cfg_schedule: str = "linear", temperature: float = 1.0,
                  orders: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  token_sampler: TokenSampler | None = None, replay: SampleRecord | None = None,
                  record_noise: bool = True, progress: bool = False,
                  grad_last_k: int | None = None) -> SampleResult:
    """Generate latents with K = ``num_iter`` AR iterations. See the module docstring.

    ``grad_last_k``: when autograd is on, only the last k AR steps are recorded for backprop (earlier
    steps run under no_grad): truncated backprop through the AR loop, to bound memory."""
    if replay is not None:
        labels, orders = replay.labels, replay.orders
        num_iter, cfg, cfg_schedule, temperature = (replay.num_iter, replay.cfg,
                                                    replay.cfg_schedule, replay.temperature)
    device, L, C = model.device, model.seq_len, model.token_embed_dim
    if labels is not None:
        labels = _int_tensor(labels, "labels", device).reshape(-1)
        if bsz is not None and bsz != labels.numel():
            raise ValueError(f"bsz={bsz} but {labels.numel()} labels were given")
        bsz = labels.numel()
    if bsz is None or not _is_int(bsz) or bsz < 1:
        raise ValueError(f"give labels, or an integer bsz >= 1 for unconditional (null-class) sampling, got bsz={bsz}")
    if not _is_int(num_iter) or not 1 <= int(num_iter) <= L:
        raise ValueError(f"num_iter must be an integer in [1, {L}] (the number of tokens), got {num_iter!r}")
    if not _is_real(cfg) or math.isnan(cfg):
        raise ValueError(f"cfg must be a finite number >= 1 (MAR's guidance scale, 1.0 = no guidance), got {cfg!r}")
    if cfg < 1.0:
        raise ValueError(f"cfg is MAR's guidance scale (1.0 = no guidance); values below 1 are not "
                         f"meaningful, got {cfg}")
    if not math.isfinite(cfg):
        raise ValueError(f"cfg must be a finite number >= 1 (MAR's guidance scale, 1.0 = no guidance), got {cfg}")
    if grad_last_k is not None and (not _is_int(grad_last_k) or grad_last_k < 1):
        raise ValueError(f"grad_last_k must be None (all steps) or an integer >= 1, got {grad_last_k!r}")
    if cfg != 1.0 and labels is None:
        raise ValueError("cfg != 1 needs class labels (the unconditional branch is the null class)")
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if orders is None:
        orders = model.sample_orders(bsz, generator)
    orders = _int_tensor(orders, "orders", device)
    if orders.shape != (bsz, L):
        raise ValueError(f"orders must be [{bsz}, {L}], got {tuple(orders.shape)}")
    if not torch.equal(orders.sort(dim=1).values, torch.arange(L, device=device).expand(bsz, L)):
        bad = [i for i in range(bsz) if not torch.equal(orders[i].sort().values, torch.arange(L, device=device))]
        raise ValueError(f"orders must hold a permutation of range({L}) in every row; rows {bad[:8]} do not")
    sampler = token_sampler if token_sampler is not None else model.default_token_sampler()
    rng = RandomStream(generator, device, replay=replay.noise if replay is not None else None,
                       record=record_noise)
    record = SampleRecord(orders=orders, labels=labels, num_iter=int(num_iter), cfg=float(cfg),
                          cfg_schedule=cfg_schedule, temperature=float(temperature))

    tokens = torch.zeros(bsz, L, C, device=device, dtype=model.dtype)  # the model's dtype (bf16, float64, ...)
    mask = torch.ones(bsz, L, device=device)
    for step in tqdm(range(num_iter), disable=not progress, desc="AR steps", leave=False):
        with torch.set_grad_enabled(torch.is_grad_enabled() and
                                    (grad_last_k is None or step >= num_iter - grad_last_k)):
            tokens, mask = _ar_step(model, step, tokens, mask, labels, orders, bsz, num_iter, cfg,
                                    cfg_schedule, temperature, sampler, rng, record)
    record.noise = rng.steps
    return SampleResult(tokens=model.unpatchify(tokens), record=record)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _int_tensor(values, name: str, device) -> torch.Tensor:
    """``values`` (a tensor, array or list of integers) as int64; a float or bool entry is an error (it
    would be truncated: 1.7 -> 1, True -> 1)."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(values)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must be integers, got a {t.dtype} tensor")
        return t.to(device=device, dtype=torch.int64)
    flat = np.asarray(values, dtype=object).reshape(-1).tolist()
    bad = [v for v in flat if not _is_int(v)]
    if bad:
        raise ValueError(f"{name} must be integers, got {bad[:8]!r}")
    return torch.as_tensor(np.asarray(values, dtype=np.int64), device=device)


def _ar_step(model, step, tokens, mask, labels, orders, bsz, num_iter, cfg, cfg_schedule,
             temperature, sampler, rng, record):
    """One AR iteration: condition, decide what to unmask, draw those tokens."""
    L = model.seq_len
    if cfg != 1.0:
        z_cond, z_uncond = model.guided_condition(tokens, mask, labels)
    else:
        z_cond, z_uncond = model.condition(tokens, mask, labels), None

    mask_len = mask_len_after_step(step, num_iter, L, int(mask[0].sum()))
    mask_next = model.mask_from_orders(orders, mask_len)
    predict = mask.bool() if step == num_iter - 1 else mask.bool() & ~mask_next.bool()
    cfg_iter = cfg_at_step(cfg, cfg_schedule, mask_len, L)

    rng.begin_step(step)
    rows = predict.nonzero(as_tuple=True)  # batch-major, positions increasing (official order)
    new = sampler(z_cond[rows], None if z_uncond is None else z_uncond[rows], cfg_iter,
                  temperature, rng.randn)
    tokens = tokens.index_put(rows, new.to(tokens.dtype))
    record.predicted.append(predict)
    record.cfg_per_step.append(cfg_iter)
    return tokens, mask_next
