"""Cheaper passes, same weights: mixed precision (``precision``) and compiled AR steps (``compile``).

Mixed precision is autocast, never a cast of the weights: parameters, optimiser state, EMA, the AR
loop's tokens, the head noise, log-probabilities and losses stay float32 (the model's dtype); matmuls
and convolutions run in bf16 (CPUs with AMX / avx512-bf16, Ampere and later GPUs) or fp16 (GPUs only,
with a gradient scaler in the trainers). Within one precision a replay is exact: the rollout worker and
the trainer run the same autocast kernels on the same inputs.

Compilation wraps the backbone's encoder and decoder and the token head with ``torch.compile`` and
``dynamic=True``: every AR step has its own number of visible tokens (encoder length) and of tokens
to predict (head rows), so static shapes would compile one graph per step size (K graphs for K steps,
each ~30 s on a 2-core CPU); dynamic shapes compile once per precision (measured: ~30-40 s for MAR-B)
and the decoder, whose length is fixed, specialises anyway. It pays off only over many images, so it
is off by default and applies to generation only (``sample``, ``evaluate``, rollout workers): the RL
trainer's replays run eager, which is why a compiled rollout's on-policy ratio is 1 only up to rounding
and the policy-gradient rule then reports the ratio instead of asserting it (``RLTrainer.exact_replay``).

``compile_mode`` is torch.compile's ``mode``. On a GPU, ``reduce-overhead`` (and ``max-autotune``) also
record CUDA graphs, which is where a batch-1 AR step wins most: it is a few hundred small kernels whose
launch cost exceeds their work. With dynamic shapes, CUDA graph trees record one graph per distinct
shape (at most K token counts per batch size), each once. A graph's outputs live in its memory pool and
are overwritten by its next replay, and every AR step replays the decoder's graph: so in these modes
each compiled call starts a new graph iteration and hands back a copy of its outputs
(``_graph_safe_call``), which costs one small copy per call and keeps every token the loop stores its own.
"""
from __future__ import annotations

import contextlib

import torch

from marval_rl.config import RecipeError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(RecipeError):
    """A precision the device cannot run, or a compile request torch cannot honour."""


def check_precision(precision: str, device: str | torch.device, key: str = "precision") -> None:
    """fp32 anywhere, bf16 on CPU and on GPUs that support it, fp16 on GPUs only."""
    if precision not in PRECISIONS:
        raise PrecisionError(f"{key}={precision!r}: unknown precision; use one of {sorted(PRECISIONS)}")
    dev = torch.device(device)
    if precision == "fp16" and dev.type != "cuda":
        raise PrecisionError(f"{key}=fp16 needs a CUDA GPU (CPU autocast has no fp16 kernels worth using); "
                             f"use {key}=bf16 on {dev.type}")
    if precision == "bf16" and dev.type == "cuda" and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"{key}=bf16 but {torch.cuda.get_device_name(dev)} has no bf16 support "
                             f"(pre-Ampere); use {key}=fp16 or fp32")
    if precision == "bf16" and dev.type == "mps":
        raise PrecisionError(f"{key}=bf16 is not supported on mps here; use {key}=fp32")


def autocast(precision: str, device: str | torch.device):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def native_bf16_cpu() -> bool:
    """Whether this CPU has bf16 instructions (AMX or avx512-bf16); without them bf16 is emulated (slower)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def check_compile_mode(mode: str, device: str | torch.device | None = None) -> None:
    """``compile_mode`` is one of torch's, and (given a device) a CUDA-graph mode runs on a CUDA device."""
    if mode not in COMPILE_MODES:
        raise PrecisionError(f"compile_mode={mode!r}: unknown mode; use one of {list(COMPILE_MODES)}")
    if mode in CUDA_GRAPH_MODES and device is not None and torch.device(device).type != "cuda":
        raise PrecisionError(f"compile_mode={mode} records CUDA graphs, which needs device=cuda (got "
                             f"device={torch.device(device).type}); use compile_mode=default"
                             f"{' or max-autotune-no-cudagraphs' if mode == 'max-autotune' else ''} there")


def check_compile(mode: str = "default") -> None:
    """``compile=true`` needs torch.compile and, on CPU, a C++ compiler for the generated kernels."""
    import shutil

    check_compile_mode(mode)
    if not hasattr(torch, "compile"):
        raise PrecisionError("compile=true needs torch >= 2.0 (torch.compile)")
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise PrecisionError("compile=true: torch.compile's CPU kernels need a C++ compiler (g++ or clang++) "
                             "on PATH; install one or use compile=false")


def _graph_safe_call(compiled):
    """``compiled`` for CUDA-graph modes: a new graph iteration per call, outputs copied out of the pool."""
    from torch.utils._pytree import tree_map

    def call(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, compiled(*args, **kwargs))
    return call


def compile_generator(model, mode: str = "default"):
    """Compile ``model``'s backbone (encoder, decoder) and token head in place; returns the model.

    The compiled functions live on the instance (not in its state dict), so checkpoints, weight
    syncing and ``load_state_dict`` are unchanged."""
    check_compile(mode)

    def compiled(fn):
        fn = torch.compile(fn, dynamic=True, mode=mode)
        return _graph_safe_call(fn) if mode in CUDA_GRAPH_MODES else fn

    model.forward_mae_encoder = compiled(model.forward_mae_encoder)
    model.forward_mae_decoder = compiled(model.forward_mae_decoder)
    head = model.one_step if hasattr(model, "one_step") else model.diffloss.net
    head.forward = compiled(head.forward)
    return model
