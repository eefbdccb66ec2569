"""Typed recipes: dataclass schema + YAML file + ``key=value`` overrides (OmegaConf does the merging).

Every recipe key has exactly one default, here. YAML files and command-line overrides only change
values; an unknown key fails with the closest valid key, a wrong type fails naming the key.
``${recipe_dir:}`` inside a value expands to the directory of the recipe file and ``${asset:NAME}``
to a file shipped in the package (``marval_rl/assets``), so recipes work from any directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class RecipeError(ValueError):
    """A recipe that cannot be used: unknown key, wrong type, bad value, missing file."""


@dataclass
class ModelSection:
    """The MAR generator: an official ``checkpoint-last.pth`` or a marval-rl checkpoint directory."""
    checkpoint: str = ""
    arch: str = ""                     # official files: mar_base | mar_large | mar_huge | path to a JSON config
    config: dict = field(default_factory=dict)  # official constructor arguments (override ``arch``)
    ema: bool = True                   # official files: load 'model_ema' (True) or 'model'


@dataclass
class VAESection:
    """The tokenizer: official ``kl16.ckpt`` or a marval-rl checkpoint directory; empty = no decoding."""
    checkpoint: str = ""
    config: dict = field(default_factory=dict)  # VAEConfig fields for official files (default KL-16)


@dataclass
class SampleSection:
    labels: list = field(default_factory=list)  # class ids; empty = the first min(8, class_num) classes
    num_per_label: int = 1
    batch_size: int = 16
    num_iter: int = 64                 # K, AR iterations
    cfg: float = 1.0                   # MAR guidance scale, 1 = none
    cfg_schedule: str = "linear"       # linear | constant
    temperature: float = 1.0
    head_steps: Optional[int] = None   # diffusion-head steps; None = the model's num_sampling_steps
    seed: int = 0
    grid_nrow: int = 8


@dataclass
class DataSection:
    """Training images: rendered emoji entities (offline), an ImageFolder tree, or cached VAE latents."""
    source: str = "emoji"              # emoji | imagefolder | latents
    root: str = ""                     # imagefolder: the tree's root; latents: the cache file
    image_size: int = 32
    per_class: int = 64                # emoji: renders per class in the train split
    augment: str = "full"              # emoji augmentation preset: none | light | full
    classes: list = field(default_factory=list)  # emoji: subset of class ids (relabelled 0..K-1); empty = all
    seed: int = 0
    num_workers: int = 0


@dataclass
class OptimSection:
    """AdamW + linear warm-up then a constant (MAR's recipe) or cosine lr, grad clipping, EMA (training.py)."""
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.02
    warmup_steps: int = 100
    grad_clip: float = 3.0
    ema: float = 0.999
    schedule: str = "constant"         # after the warm-up: constant | cosine (decay to 0 at `steps`)


@dataclass
class VAETrainSection:
    config: dict = field(default_factory=lambda: {
        "embed_dim": 16, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "resolution": 32,
        "attn_resolutions": [], "z_channels": 16, "num_groups": 16, "latent_scale": 1.0})
    optim: OptimSection = field(default_factory=lambda: OptimSection(steps=1000, batch_size=32, lr=2e-3,
                                                                    weight_decay=0.0, warmup_steps=100, ema=0.0))
    kl_weight: float = 1e-6
    auto_latent_scale: bool = True     # set latent_scale = 1/std of train latents (MAR's 0.2325 idea)


@dataclass
class MARTrainSection:
    config: dict = field(default_factory=lambda: {
        "img_size": 32, "vae_stride": 4, "encoder_embed_dim": 128, "encoder_depth": 3,
        "encoder_num_heads": 4, "decoder_embed_dim": 128, "decoder_depth": 3, "decoder_num_heads": 4,
        "buffer_size": 8, "class_num": 56, "diffloss_d": 3, "diffloss_w": 128, "diffusion_batch_mul": 2,
        "attn_dropout": 0.0, "proj_dropout": 0.0, "label_drop_prob": 0.1, "head_clip_x0": 5.0})
    optim: OptimSection = field(default_factory=lambda: OptimSection(steps=4000, lr=1e-3, warmup_steps=200,
                                                                    ema=0.999))


@dataclass
class ClassifierTrainSection:
    optim: OptimSection = field(default_factory=lambda: OptimSection(steps=1500, lr=2e-3, weight_decay=0.01,
                                                                    warmup_steps=50, ema=0.0, batch_size=128,
                                                                    schedule="cosine"))
    test_per_class: int = 16


@dataclass
class ClipTrainSection:
    """The embedded CLIP (open_clip architecture, tiny config) trained contrastively on emoji renders."""
    config: dict = field(default_factory=dict)   # model config overrides; defaults live in models/embedded_clip.py
    optim: OptimSection = field(default_factory=lambda: OptimSection(steps=600, lr=2e-3, weight_decay=0.1,
                                                                    warmup_steps=50, ema=0.0, batch_size=112,
                                                                    schedule="cosine"))
    test_per_class: int = 16


@dataclass
class PretrainSection:
    stages: list = field(default_factory=lambda: ["vae", "mar"])  # vae | mar | classifier | clip
    vae: VAETrainSection = field(default_factory=VAETrainSection)
    mar: MARTrainSection = field(default_factory=MARTrainSection)
    classifier: ClassifierTrainSection = field(default_factory=ClassifierTrainSection)
    clip: ClipTrainSection = field(default_factory=ClipTrainSection)
    log_every: int = 50
    sample_every: int = 1000           # sample grids (MAR) / reconstruction grids (VAE); 0 = off
    checkpoint_every: int = 500
    seed: int = 0


@dataclass
class DistillSection:
    """GSIM distillation of the teacher's diffusion head into a one-step head (docs/distill.md)."""
    cfg: float = 1.2                   # MAR's guidance scale, 1 = none: teacher eps = eps(null) + cfg (eps(c) - eps(null))
    huber_r: float = 1e-5              # pseudo-Huber constant r (paper: 1e-5)
    huber_axis: str = "token"          # norm over each 16-d token (t per token) | over a sample's masked tokens (one t per sample)
    detach_dprime: bool = False        # False = exact gradient (Gradient Equivalent Theorem)
    t_min: int = 20                    # generator-loss timesteps ~ U{t_min..t_max} (1000-step scale)
    t_max: int = 980
    time_weight: str = "sigma"         # sigma: w(t) = sqrt(1 - ab_t), the loss in eps units | none
    init_timestep: int = 950           # g_theta = x0-prediction of the teacher head at t*
    train_backbone: bool = False       # False: only the head trains; the teacher's z is the condition
    fake_steps_per_gen: int = 1        # auxiliary-score updates per generator update
    mask_ratio_min: Optional[float] = None  # context masks ~ N(1, .25) on [min, 1]; None = teacher's
    generator_optim: OptimSection = field(default_factory=lambda: OptimSection(
        steps=2000, batch_size=32, lr=1e-4, betas=[0.0, 0.999], weight_decay=0.0, warmup_steps=0,
        grad_clip=1.0, ema=0.99))
    fake_optim: OptimSection = field(default_factory=lambda: OptimSection(
        steps=2000, batch_size=32, lr=1e-4, betas=[0.0, 0.999], weight_decay=0.0, warmup_steps=0,
        grad_clip=1.0, ema=0.0))
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    seed: int = 0


# Keys that were renamed: the old name fails with what it became (see ``_check_keys``).
RENAMED_KEYS = {
    "distill.guidance_w": ("distill.cfg", lambda w: 1 + w,
                           "MAR's convention, 1 = no guidance; the old key meant (1 + w) eps(c) - w eps(null), "
                           "so cfg = 1 + guidance_w"),
    "train.train_backbone": ("train.trainable", None,
                             "name the parameter groups that train: [head] (the old false), [all] (the old true), "
                             "or any of head, class_embedding, backbone"),
}


@dataclass
class RewardSpec:
    """One reward: a registry name ("clip_score", ...) or "path/to/file.py:Class" / "pkg.module:Class"."""
    name: str = ""
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


@dataclass
class TrainSection:
    """RL post-training of a MARVAL policy (docs/rl.md)."""
    algorithm: str = "reward_gradient"   # update rule: reward_gradient | policy_gradient | "path/file.py:Class"
    rewards: list[RewardSpec] = field(default_factory=list)   # optimised (weighted sum)
    gold: list[RewardSpec] = field(default_factory=list)      # held-out: computed and logged, never optimised
    iterations: int = 30
    num_workers: int = 2                 # rollout workers (Ray actors, or in-process with --no-ray)
    rollouts_per_worker: int = 8         # images per worker per iteration (one optimiser step per iteration)
    group_size: int = 8                  # G samples per prompt (policy gradient's group-normalised advantages)
    num_iter: int = 8                    # K AR iterations of the policy
    classes: list = field(default_factory=list)  # class ids prompts are drawn from; empty = all
    prompt_template: str = "photo"       # key of marval_rl.data.prompts.TEMPLATES or a string with {}
    class_names: list = field(default_factory=list)  # entity names per class id; empty = emoji-56 / ImageNet
    trainable: list = field(default_factory=lambda: ["head"])  # parameter groups: head | class_embedding | backbone | all
    group_lr: dict = field(default_factory=dict)  # lr per trainable group (e.g. {head: 1e-5}); others: optim.lr
    # reward gradient
    grad_last_k: Optional[int] = None    # backprop through the last k AR steps only (None = all K)
    detach_context: bool = False         # earlier steps' tokens enter later steps' context detached
    grad_checkpointing: bool = False     # activation checkpointing in the backbone blocks
    normalize_reward: bool = True        # divide the reward by its running per-sample std (scale-free lr and reg_weight)
    reward_norm_momentum: float = 0.1    # EMA rate of that running std (per iteration)
    reg_weight: float = 1.0              # anchor: per-dim mean |g_theta - g_ref|^2 vs the reference MODEL, per reward std
    # policy gradient
    explore_std: Optional[float] = None  # Gaussian action std; None = 0 (reward gradient) / 0.1 (policy gradient)
    explore_steps: list = field(default_factory=list)  # AR steps (0-based) that explore; empty = all
    share_noise: bool = True             # group members share mask order and head noise: only exploration differs
    kl_weight: float = 0.0               # closed-form per-dim KL to the reference policy
    clip_range: float = 1e-4             # PPO clip of the per-dim-mean log-ratio (matters only for ppo_epochs > 1)
    adv_clip: float = 5.0                # advantages clipped to +- this
    ppo_epochs: int = 1                  # optimiser steps per rollout batch (1 = on-policy: ratio exactly 1)
    optim: OptimSection = field(default_factory=lambda: OptimSection(
        steps=0, batch_size=8, lr=1e-5, betas=[0.9, 0.999], weight_decay=0.0, warmup_steps=0, grad_clip=1.0,
        ema=0.0))
    grid_every: int = 10
    checkpoint_every: int = 10
    eval_per_class: int = 2              # fixed eval set (every class x eval_per_class, fixed seeds); 0 = off
    eval_every: int = 0                  # also score the fixed eval set every N iterations (0 = start and end only)
    eval_real: str = "auto"              # ceiling on real images: auto (held-out emoji renders for the 56-class
                                         # embedded policy) | off
    seed: int = 0
    use_ray: bool = True                 # False (or --no-ray): every worker runs in this process
    ray_address: str = ""                # "" = start a local cluster; "auto" / "ray://host:port" = join one
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    worker_threads: int = 1              # torch threads per rollout worker
    trainer_ranks: int = 1               # data-parallel trainer ranks as Ray actors (docs/ray.md); 1 = in this process
    trainer_threads: int = 1             # torch threads (and Ray CPUs) per trainer rank when trainer_ranks > 1
    wandb: str = "off"                   # off | offline | online (needs the wandb extra)
    wandb_project: str = "marval-rl"
    wandb_name: str = ""                 # "" = the output folder's name
    wandb_group: str = ""                # e.g. one group per sweep


@dataclass
class EvaluateSection:
    per_class: int = 10                # samples per class
    classes: list = field(default_factory=list)  # class ids; empty = all
    classifier: str = "${asset:embedded/classifier}"
    fid_stats: str = "${asset:embedded/fid}"
    batch_size: int = 64


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    vae: VAESection = field(default_factory=VAESection)
    sample: SampleSection = field(default_factory=SampleSection)
    data: DataSection = field(default_factory=DataSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    distill: DistillSection = field(default_factory=DistillSection)
    train: TrainSection = field(default_factory=TrainSection)
    device: str = "cpu"
    precision: str = "fp32"            # fp32 | bf16 | fp16 (GPU): autocast for sampling, rollouts, rewards, RL/distill
    compile: bool = False              # torch.compile the backbone and head for generation (sample, evaluate, rollouts)
    output_dir: str = "outputs/run"


def asset_path(name: str = "") -> str:
    """Path of a file shipped inside the package (``marval_rl/assets/NAME``); ``${asset:NAME}`` in recipes."""
    return str(Path(__file__).parent / "assets" / name)


def _check_keys(schema: type, data: Any, prefix: str = "") -> None:
    """Reject keys the schema does not have, suggesting the closest valid one."""
    if not isinstance(data, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in RENAMED_KEYS:
            new_key, convert, why = RENAMED_KEYS[full]
            try:
                example = f" ({full}={value} is {new_key}={convert(float(value)):g})" if convert else ""
            except (TypeError, ValueError):
                example = ""
            raise RecipeError(f"recipe key '{full}' is now '{new_key}'{example}: {why}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise RecipeError(f"unknown recipe key '{full}'{hint}; valid keys under "
                              f"'{prefix.rstrip('.') or '<top>'}': {sorted(fields)}")
        sub_type = typing.get_type_hints(schema)[key]
        if dataclasses.is_dataclass(sub_type):
            if value is not None and not isinstance(value, dict):
                raise RecipeError(f"recipe key '{full}' is a section; give it as a mapping, got {value!r}")
            _check_keys(sub_type, value, full + ".")


def shipped_recipes() -> dict[str, Path]:
    """name -> file of the recipes shipped in the package (the repo's ``recipes/``, installed as
    ``marval_rl.recipes``)."""
    from importlib.resources import files

    root = Path(str(files("marval_rl.recipes")))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def recipe_purpose(path: Path) -> str:
    """The first comment line of a recipe: what it is for."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: an existing path, or the name of a shipped recipe (``quickstart`` or
    ``quickstart.yaml``); otherwise RecipeError with the closest shipped names."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.exists():
        raise RecipeError(f"recipe {name_or_path}: is a directory, not a YAML file")
    shipped = shipped_recipes()
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if len(p.parts) == 1 and name in shipped:
        return shipped[name]
    close = difflib.get_close_matches(name, list(shipped), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise RecipeError(f"recipe not found: {name_or_path} (neither a file nor a shipped recipe{hint} "
                      f"`marval-rl recipes` lists them)")


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), schema: type = Recipe):
    """Load ``path`` (a YAML file or a shipped recipe's name) over the schema's defaults, then apply
    ``key=value`` overrides."""
    if path is not None:
        path = find_recipe(path)
    recipe_dir = str(Path(path).resolve().parent) if path else str(Path.cwd())
    # omegaconf 2.4 renamed register_new_resolver; resolution happens below, inside this call.
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register("recipe_dir", lambda: recipe_dir, replace=True)
    register("asset", asset_path, replace=True)
    layers = []
    if path is not None:
        try:
            layer = OmegaConf.load(path)
        except OSError as e:
            if "Invalid loaded object type" not in str(e):
                raise RecipeError(f"cannot read recipe {path}: {e}") from e
            layer = str(e).rsplit(":", 1)[-1].strip()   # a scalar at the top level
        except Exception as e:
            raise RecipeError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(layer, DictConfig):
            kind = ("a list" if isinstance(layer, ListConfig) else
                    f"a scalar ({layer})" if isinstance(layer, str) else type(layer).__name__)
            raise RecipeError(f"{path}: the top level of a recipe must be a mapping of sections (model:, sample:, "
                              f"train:, ...), got {kind}")
        layers.append(layer)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key=value")
        try:
            OmegaConf.from_dotlist([item])
        except Exception as e:  # the value is parsed as YAML: "{} and {}" is a broken mapping
            key, _, value = item.partition("=")
            raise RecipeError(f"override {item!r}: the value of '{key}' is not valid YAML "
                              f"({' '.join(str(e).split())}); quote it: {key}='{value}' inside double quotes "
                              f"for the shell, e.g. \"{key}='{value}'\"") from e
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise RecipeError(f"bad override: {e}") from e
    for layer in layers:
        _check_keys(schema, OmegaConf.to_container(layer, resolve=False))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        recipe = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).split("\n")[0]
        raise RecipeError(f"recipe key '{key}': {msg}" if key else f"invalid recipe: {msg}") from e
    check_values(recipe)
    return recipe


# Lists of class ids (and AR step indices): integers only. A float would be truncated (1.7 -> class 1) and
# a bool taken as a class (True -> 1).
INT_LIST_KEYS = ("sample.labels", "train.classes", "evaluate.classes", "data.classes", "train.explore_steps")
CLASS_LIST_KEYS = ("sample.labels", "train.classes", "evaluate.classes")   # ids or names (class_ids_from)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_values(node, prefix: str = "") -> None:
    """The rule every recipe value obeys, whatever command reads it: a float is finite (no key means
    nan or inf: "no limit" is a separate key or null wherever a recipe offers it), float lists too
    (``*.betas``: two numbers in [0, 1)), the class-id lists of :data:`INT_LIST_KEYS` hold integers and
    every ``seed`` is in [0, 2**63).
    Free-form mappings (``model.config``, reward ``kwargs``, ``train.group_lr``) are checked by their
    readers. Raises RecipeError naming the key."""
    for f in dataclasses.fields(node):
        key, v = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(v):
            check_values(v, key + ".")
        elif isinstance(v, float) and not math.isfinite(v):
            raise RecipeError(f"recipe key '{key}' must be a finite number, got {v}")
        elif f.name == "seed" and _is_int(v) and not 0 <= v < 2 ** 63:
            raise RecipeError(f"recipe key '{key}' must be in [0, 2**63), got {v}")
        elif isinstance(v, list):
            if key in INT_LIST_KEYS:
                # class lists may name classes ("lion"); their readers turn names into ids
                named_ok = key in CLASS_LIST_KEYS
                bad = [x for x in v if not (_is_int(x) or (named_ok and isinstance(x, str) and x.strip()))]
                if bad:
                    what = "class ids or class names" if named_ok else "integers"
                    raise RecipeError(f"recipe key '{key}' must list {what}, got {bad!r} in {v!r}")
            if f.name == "betas" and not (len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)):
                raise RecipeError(f"recipe key '{key}' must be two numbers in [0, 1) (Adam's beta1, beta2), got {v!r}")
            for i, x in enumerate(v):
                if dataclasses.is_dataclass(x):
                    check_values(x, f"{key}[{i}].")
                elif isinstance(x, float) and not math.isfinite(x):
                    raise RecipeError(f"recipe key '{key}' must hold finite numbers, got {x} in {v!r}")


def check_optim(o: "OptimSection", key: str, min_steps: int = 1) -> None:
    """The values an optimiser section needs (``key``: where it sits, e.g. ``distill.generator_optim``)."""
    rules = [("steps", o.steps >= min_steps, f">= {min_steps}"), ("batch_size", o.batch_size >= 1, ">= 1"),
             ("lr", o.lr > 0, "> 0"), ("weight_decay", o.weight_decay >= 0, ">= 0"),
             ("warmup_steps", o.warmup_steps >= 0, ">= 0"), ("grad_clip", o.grad_clip >= 0, ">= 0 (0 = off)"),
             ("ema", 0 <= o.ema < 1, "in [0, 1) (0 = off)"),
             ("schedule", o.schedule in ("constant", "cosine"), "constant or cosine")]
    for name, ok, rule in rules:
        if not ok:
            raise RecipeError(f"{key}.{name} must be {rule}, got {getattr(o, name)}")


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(device: str, key: str = "device", here: bool = True) -> None:
    """``device`` is cpu, cuda, cuda:N or mps and, with ``here``, one this machine has (N < its GPU count):
    a recipe written for a GPU box stays valid elsewhere (``here=False``), running it is refused here."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        d = None
    if d is None or d.type not in DEVICE_TYPES:
        raise RecipeError(f"{key}: unknown device {device!r}; use cpu, cuda, cuda:N or mps")
    if not here:
        return
    if d.type == "cpu" and d.index not in (None, 0):
        raise RecipeError(f"{key}={device}: the CPU has no device index; use {key}=cpu")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError(f"{key}={device} but this machine has no CUDA GPU (torch.cuda.is_available() is "
                              f"False: no GPU, no driver, or a CPU-only torch); use {key}=cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise RecipeError(f"{key}={device} but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise RecipeError(f"{key}={device} but MPS (Apple GPU) is not available here; use {key}=cpu")


def recipe_to_yaml(recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
