"""LoRA adapters (peft) on a generator's Linear layers: which layers, injecting, merging, the adapter folder.

A recipe section ``train.lora`` (RL) or ``distill.lora`` (the student) = {targets, rank, alpha,
dropout}; LoRA is off while ``targets`` is empty. ``targets`` names groups (:data:`LORA_GROUPS`):
``backbone``, the transformer blocks' attention and MLP Linears (qkv, proj, fc1, fc2), and ``head``,
the one-step head's Linears except its timestep embedder (its input is the fixed t*, so its output
is a constant), or module names in peft's sense: a full module name or its last dotted parts (``qkv``,
``decoder_blocks.2.mlp.fc2``).

The adapters are peft's own layers (``LoraConfig`` + ``inject_adapter_in_model``), injected into the
model in place: parameter names stay the model's (``...qkv.base_layer.weight`` beside
``...qkv.lora_A.default.weight``), so the trainers' name-based machinery (optimiser, EMA, weight sync
to the rollout workers, state file) handles the adapters like any other trained parameter. A layer
trains either fully (``train.trainable``) or through LoRA, never both (:func:`check_no_overlap`).

What is saved: :func:`merged_copy` folds the adapters into the base weights (peft's ``merge``) and
unwraps the layers, giving a plain checkpoint that loads without peft; :func:`save_adapter` writes
the adapter in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
``peft.PeftModel.from_pretrained(base_model, folder)``).
"""
from __future__ import annotations

import copy
import difflib
import math
from pathlib import Path

import torch
from torch import nn

PEFT_MISSING = "LoRA ({key}) needs peft, which is not installed: pip install 'marval-rl[lora]'"

# groups of Linear layers a recipe can name in ``lora.targets``: name -> predicate on the module's name
LORA_GROUPS = {
    "backbone": lambda n: n.startswith(("encoder_blocks.", "decoder_blocks."))
    and n.rsplit(".", 2)[-2:] in (["attn", "qkv"], ["attn", "proj"], ["mlp", "fc1"], ["mlp", "fc2"]),
    "head": lambda n: n.startswith("one_step.") and ".time_embed." not in n,
}

# the plain trainable groups whose parameters are whole modules, saved in the adapter as peft's
# ``modules_to_save`` (a fully trained backbone is not one module: it is in the merged policy only)
WHOLE_MODULE_GROUPS = {"class_embedding": "class_emb", "head": "one_step"}


def enabled(section) -> bool:
    return bool(section.targets)


def require_peft(key: str):
    try:
        import peft
    except ImportError as e:
        raise ImportError(PEFT_MISSING.format(key=key), name="peft") from e
    return peft


def check_lora_section(section, key: str) -> None:
    """The section's values (no model needed); raises ValueError naming the key."""
    if not enabled(section):
        return
    bad = [t for t in section.targets if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ValueError(f"{key}.targets must list group names ({', '.join(LORA_GROUPS)}) or module names, "
                         f"got {bad!r}")
    if isinstance(section.rank, bool) or not isinstance(section.rank, int) or section.rank < 1:
        raise ValueError(f"{key}.rank must be an integer >= 1, got {section.rank!r}")
    alpha = section.alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{key}.alpha must be a finite number > 0 (the update is scaled by alpha / rank), "
                         f"got {alpha!r}")
    if not 0.0 <= float(section.dropout) < 1.0:
        raise ValueError(f"{key}.dropout must be in [0, 1), got {section.dropout!r}")


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's Linear layers; in a model with adapters, the adapted layers (not peft's insides)."""
    out = []
    for n, m in model.named_modules():
        parts = n.split(".")
        if "base_layer" in parts or any(p.startswith("lora_") for p in parts):
            continue
        if isinstance(m.get_base_layer() if hasattr(m, "get_base_layer") else m, nn.Linear):
            out.append(n)
    return out


def resolve_targets(model: nn.Module, section, key: str) -> list[str]:
    """Full names of the Linear layers ``section.targets`` selects, in the model's order.

    A name that selects nothing fails with the closest Linear names (any dotted tail of one)."""
    names = linear_names(model)
    chosen: set[str] = set()
    for t in section.targets:
        t = t.strip()
        hit = [n for n in names if LORA_GROUPS[t](n)] if t in LORA_GROUPS else \
            [n for n in names if n == t or n.endswith("." + t)]
        if not hit:
            tails = sorted({".".join(n.split(".")[i:]) for n in names for i in range(n.count(".") + 1)})
            close = difflib.get_close_matches(t, tails + list(LORA_GROUPS), n=3, cutoff=0.5)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(names[:3])}"
            raise ValueError(f"{key}.targets: no Linear layer of the model is named '{t}' ({hint}; groups: "
                             f"{', '.join(LORA_GROUPS)})")
        chosen.update(hit)
    return [n for n in names if n in chosen]


def check_targets(mar_config, section, key: str, plain_names=None, plain_key: str = "") -> None:
    """``section.targets`` against a MARVAL of ``mar_config`` built on the meta device (no weights, no
    memory), and, with ``plain_names(model)`` (the fully trained parameters' names), no layer in both: a
    typo stops before anything loads."""
    if not enabled(section):
        return
    from marval_rl.models.one_step import MARVAL, MARVALConfig

    with torch.device("meta"):
        model = MARVAL(MARVALConfig(mar=mar_config.to_dict()))
    targets = resolve_targets(model, section, key)
    if plain_names is not None:
        check_no_overlap(targets, plain_names(model), key, plain_key)


def check_no_overlap(targets: list[str], plain_names: list[str], key: str, plain_key: str) -> None:
    """A layer trains fully or through LoRA, not both (the full update would make the adapter moot)."""
    both = [t for t in targets if f"{t}.weight" in set(plain_names)]
    if both:
        raise ValueError(f"{key}.targets and {plain_key} both train {', '.join(both[:3])}"
                         f"{' ...' if len(both) > 3 else ''}: a layer trains either fully or through LoRA; "
                         f"name in {plain_key} only the groups that train fully ([] for LoRA alone)")


def lora_config(section, targets: list[str], modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(r=int(section.rank), lora_alpha=float(section.alpha), lora_dropout=float(section.dropout),
                      target_modules=list(targets), modules_to_save=modules_to_save or None, bias="none")


def add_lora(model: nn.Module, section, key: str, seed: int = 0) -> list[str]:
    """Inject peft LoRA adapters into ``model`` in place; returns the adapter parameters' names.

    peft initialises A randomly (from ``seed``, in a forked RNG: the caller's random stream is untouched,
    and every process that injects the same section gets the same A) and B = 0, so the adapted model
    starts equal to the base. peft marks only adapters as trainable; the caller decides what trains."""
    peft = require_peft(key)
    targets = resolve_targets(model, section, key)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(lora_config(section, targets), model)
    return adapter_names(model)


def tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(model: nn.Module) -> bool:
    try:
        return bool(tuner_layers(model))
    except ImportError:
        return False


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapter parameters (lora_A / lora_B of every adapted layer), in the model's order."""
    layers = tuner_layers(model)
    return [f"{ln}.{pn}" for ln, layer in layers for pn, _ in layer.named_parameters()
            if not pn.startswith("base_layer.")]


def set_adapters(model: nn.Module, on: bool) -> None:
    for _, layer in tuner_layers(model):
        layer.enable_adapters(on)


def frozen_base(model: nn.Module, trained: list[str]) -> nn.Module:
    """The starting model for the anchor / KL: the SAME frozen tensors as ``model`` (no copy of them),
    its adapters disabled, and private frozen copies of only the ``trained`` parameters at their
    current values (so call it before training)."""
    trained = set(trained)
    memo = {id(p): p for n, p in model.named_parameters() if n not in trained}
    memo.update({id(b): b for b in model.buffers()})
    base = copy.deepcopy(model, memo)
    if has_adapters(base):
        set_adapters(base, False)
    return base.requires_grad_(False)


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every adapter merged into its base weights (peft's ``merge``) and the
    peft layers replaced by their plain base layers: the state dict of a model that never had LoRA."""
    merged = copy.deepcopy(model)
    for name, layer in tuner_layers(merged):
        layer.merge(safe_merge=True)   # safe_merge: a non-finite merged weight raises instead of saving
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent) if parent else merged, child, layer.get_base_layer())
    return merged


def save_adapter(model: nn.Module, section, directory: str | Path, plain_groups=()) -> Path:
    """Write ``model``'s adapter in peft's format to ``directory``; the fully trained ``plain_groups`` that
    are whole modules (class_embedding, head) go with it as peft's ``modules_to_save``."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from marval_rl.models.checkpoints import atomic_write

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = [n for n, _ in tuner_layers(model)]
    keep = [WHOLE_MODULE_GROUPS[g] for g in plain_groups if g in WHOLE_MODULE_GROUPS]
    # peft's key layout of a saved adapter: the wrapped model's prefix, adapter names dropped
    tensors = {f"base_model.model.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    for module in keep:
        tensors.update({f"base_model.model.{module}.{k}": v for k, v in model.get_submodule(module).state_dict().items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    config = lora_config(section, targets, keep)
    config.inference_mode = True
    config.save_pretrained(str(directory))
    atomic_write(directory / "adapter_model.safetensors", lambda p: save_file(tensors, p))
    return directory
