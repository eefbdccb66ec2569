"""The recipe schema: one dataclass per recipe section, and every key's one default.

Loading, merging, ``${...}`` expansion and the value checks are in config.py, which re-exports these
classes (``from marval_rl.config import TrainSection`` keeps working).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
    cache_file: str = ""               # `marval-rl cache` writes the latents of data.root here (docs/data.md)
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
class LoraSection:
    """LoRA adapters (peft) on Linear layers (marval_rl/lora.py); off while ``targets`` is empty."""
    targets: list = field(default_factory=list)  # groups (backbone | head) or module names (peft's suffix match)
    rank: int = 8                      # r: the adapter's inner dimension
    alpha: float = 16.0                # the update B A is scaled by alpha / rank
    dropout: float = 0.0               # dropout on the adapter's input (RL: must be 0, the replay equals the rollout)


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
    lora: LoraSection = field(default_factory=LoraSection)  # LoRA on the student: only the adapters train
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
    group_lr: dict = field(default_factory=dict)  # lr per trainable group (e.g. {head: 1e-5}, lora: 1e-3); others: optim.lr
    lora: LoraSection = field(default_factory=LoraSection)  # LoRA adapters that train beside the `trainable` groups
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
    """``marval-rl evaluate``: a fixed, class-balanced list of (class, seed) items, generated in resumable
    chunks (sharded over ranks under torchrun) and scored (docs/evaluate.md)."""
    metrics: list = field(default_factory=lambda: ["fid_proxy", "accuracy"])  # also fid | inception_score |
                                       # a reward name (clip_score, image_reward, pickscore, ...: the registry)
    per_class: int = 10                # samples per class (when num_images is 0)
    num_images: int = 0                # total images, a multiple of the class count (50000: FID-50k); 0 = per_class x classes
    classes: list = field(default_factory=list)  # class ids; empty = all
    classifier: str = "${asset:embedded/classifier}"   # fid_proxy / accuracy
    fid_stats: str = "${asset:embedded/fid}"           # fid_proxy's reference statistics
    inception_weights: str = ""        # fid / inception_score: pt_inception-2015-12-05-6726825d.pth; "" = torch hub cache
    reference_stats: str = ""          # fid: .npz with mu [2048], sigma [2048, 2048] (MAR's fid_stats/adm_in256_stats.npz)
    is_splits: int = 10                # Inception Score splits (torch-fidelity's and MAR's 10)
    reward_kwargs: dict = field(default_factory=dict)  # reward metric name -> its constructor kwargs
    prompt_template: str = "photo"     # reward metrics' prompt per class (marval_rl.data.prompts.TEMPLATES or "{}")
    save_every: int = 1000             # images per saved chunk: a killed run redoes at most this many per rank
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
    compile_mode: str = "default"      # torch.compile's mode; reduce-overhead / max-autotune add CUDA graphs (GPU)
    output_dir: str = "outputs/run"
