"""Alternating GSIM training: the auxiliary score phi tracks the student, the student theta follows GSIM.

One step:
  1. context: a batch of real latents, MAR-style random orders and one mask ratio per batch;
     the frozen teacher backbone gives z_c (class) and z_null (null class) at the masked positions;
  2. the student draws every masked token in ONE call: x = g_theta(noise, z);
  3. phi-update(s): the ordinary diffusion (eps-MSE) loss of S_phi on sg[x], t ~ U{0..999};
  4. theta-update: the GSIM loss (``gsim.py``) with the guided teacher eps in MAR's convention,
     eps_T(x_t, z_null) + cfg (eps_T(x_t, z_c) - eps_T(x_t, z_null)) (cfg = 1: no guidance), and S_phi,
     both frozen, gradients reaching theta through x_t = a_t x + s_t eps. ``huber_axis="token"`` draws
     one t per token and takes the pseudo-Huber norm per token; ``"sample"`` draws one t per sample
     and takes the norm over all of that sample's masked tokens (the theorem's setting in both cases:
     one diffusion time per variable the norm is taken over).
Data parallel (torchrun): every random draw is made for the global batch on every rank and each rank
keeps its rows (``distributed.shard``), so N ranks at batch B/N compute one process's step at batch B.
The loop is the shared one (training.run_loop): its training state holds both trainables (the
student's trained part and S_phi) with their optimisers and the student's EMA, the generator and the
step, so a killed run resumes exactly. The EMA student is what gets saved as the policy.
``distill.lora``: peft LoRA adapters on the student's head and / or backbone train instead (marval_rl/lora.py);
the student is saved merged (a plain checkpoint) and the adapter in peft's format beside it (``adapter/``).
"""
from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import torch

from marval_rl import distributed, lora
from marval_rl.acceleration import autocast
from marval_rl.config import DistillSection
from marval_rl.distill.gsim import gsim_loss_eps
from marval_rl.eval.images import save_grid
from marval_rl.models.checkpoints import save_pretrained
from marval_rl.models.mar import MAR
from marval_rl.models.one_step import MARVAL
from marval_rl.sampling import sample_tokens
from marval_rl.training import Trainable, run_loop


def check_section(s: DistillSection) -> None:
    """Every problem of the distill section as one ValueError naming the key, before anything loads."""
    from marval_rl.config import check_optim, check_values

    check_values(s, "distill.")
    if not s.cfg >= 1:
        raise ValueError(f"distill.cfg must be >= 1 (MAR's guidance scale, 1 = no guidance), got {s.cfg}")
    if s.huber_r <= 0:
        raise ValueError(f"distill.huber_r must be > 0, got {s.huber_r}")
    check_optim(s.generator_optim, "distill.generator_optim")   # steps = 0 would ship the undistilled head
    check_optim(s.fake_optim, "distill.fake_optim", min_steps=0)
    if s.log_every < 1:
        raise ValueError(f"distill.log_every must be >= 1, got {s.log_every}")
    for key in ("sample_every", "checkpoint_every"):
        if getattr(s, key) < 0:
            raise ValueError(f"distill.{key} must be >= 0 (0 = off), got {getattr(s, key)}")
    if not 0 <= s.init_timestep <= 999:
        raise ValueError(f"distill.init_timestep must be in [0, 999] (the 1000-step schedule), got {s.init_timestep}")
    if s.mask_ratio_min is not None and not 0 < s.mask_ratio_min <= 1:
        raise ValueError(f"distill.mask_ratio_min must be in (0, 1] or null (the teacher's), got {s.mask_ratio_min}")
    if s.huber_axis not in ("token", "sample"):
        raise ValueError(f"distill.huber_axis must be 'token' or 'sample', got {s.huber_axis!r}")
    if s.time_weight not in ("sigma", "none"):
        raise ValueError(f"distill.time_weight must be 'sigma' or 'none', got {s.time_weight!r}")
    if not 0 <= s.t_min <= s.t_max <= 999:
        raise ValueError(f"need 0 <= distill.t_min <= distill.t_max <= 999, got {s.t_min}, {s.t_max}")
    if s.fake_steps_per_gen < 1:
        raise ValueError("distill.fake_steps_per_gen must be >= 1")
    lora.check_lora_section(s.lora, "distill.lora")
    if lora.enabled(s.lora):
        if s.train_backbone:
            raise ValueError("distill.lora and distill.train_backbone=true: with LoRA only the adapters train; "
                             "set distill.train_backbone=false and name the backbone in distill.lora.targets")
        lora.require_peft("distill.lora")


class GSIMDistiller:
    """The distillation stage of the shared loop (training.run_loop): teacher (frozen), student and
    auxiliary score, the two trainables ``generator`` and ``fake``; :meth:`step` is one GSIM step."""

    name = "distill"

    def __init__(self, teacher: MAR, section: DistillSection, precision: str = "fp32"):
        if type(teacher) is not MAR:
            raise ValueError(f"the teacher must be a MAR with its diffusion head, got {type(teacher).__name__} "
                            f"(a MARVAL student checkpoint was given where a teacher is expected?)")
        check_section(section)
        self.s, self.teacher = section, teacher.eval().requires_grad_(False)
        self.student = MARVAL.from_teacher(teacher, section.init_timestep).train()
        self.student.requires_grad_(False)
        self.use_lora = lora.enabled(section.lora)
        if self.use_lora:   # peft adapters on the student (marval_rl/lora.py): they alone train
            adapters = lora.add_lora(self.student, section.lora, "distill.lora", seed=section.seed)
            self.student.requires_grad_(False)
            for n, p in self.student.named_parameters():
                p.requires_grad_(n in set(adapters))
            self.trainable = self.student
            # adapters in the backbone: the student computes its own condition (as with train_backbone)
            self.student_condition = any(not n.startswith("one_step.") for n in adapters)
        else:
            self.trainable = self.student if section.train_backbone else self.student.one_step
            self.trainable.requires_grad_(True)
            self.student_condition = section.train_backbone
        self.fake = copy.deepcopy(teacher.diffloss.net).train().requires_grad_(True)
        # precision: the teacher, student and S_phi passes run under autocast (fp32 master weights, Adam
        # state and EMA; the losses are formed in fp32); fp16 also scales each player's loss
        self.precision = precision
        scaled = precision == "fp16"
        # The generator's EMA covers what trains only (for MAR-B the frozen backbone is 170M parameters).
        self.trainables = [Trainable("generator", self.trainable, section.generator_optim, loss_scaling=scaled,
                                     ema_trained_only=self.use_lora),
                           Trainable("fake", self.fake, section.fake_optim, loss_scaling=scaled)]
        # set by distill(): where step() draws real latents from, and what sample() decodes with / writes to
        self.batches = self.vae = self.out_dir = None
        tables = teacher.diffloss.train_diffusion
        self.sqrt_ab = tables.sqrt_alphas_cumprod.float()
        self.sigma = tables.sqrt_one_minus_alphas_cumprod.float()
        self.C = teacher.token_embed_dim

    # --------------------------------------------------------------------------- context
    def context(self, latents: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        t = self.teacher
        tokens = t.patchify(latents)
        orders = distributed.shard(t.sample_orders(len(labels) * distributed.world_size(), gen))
        rate = t.sample_mask_rate(gen, self.s.mask_ratio_min)
        mask = t.mask_from_orders(orders, max(1, math.ceil(t.seq_len * rate)))
        with torch.no_grad():
            z_c, z_u = t.guided_condition(tokens, mask, labels)
        rows = mask.bool().nonzero(as_tuple=True)
        z_c, z_u = z_c[rows], z_u[rows]
        z_s = self.student.condition(tokens, mask, labels)[rows] if self.student_condition else z_c
        return z_c, z_u, z_s, len(labels)

    def _rand(self, shape, gen, dev):
        """This rank's rows of a standard-normal draw for the global batch (``shape`` is the local one)."""
        rows = shape[0] * distributed.world_size()
        return distributed.shard(torch.randn((rows, *shape[1:]), generator=gen, device=gen.device)).to(dev)

    def _randint(self, low, high, rows, gen, dev):
        """This rank's ``rows`` of a uniform integer draw for the global batch."""
        n = rows * distributed.world_size()
        return distributed.shard(torch.randint(low, high, (n,), generator=gen, device=gen.device)).to(dev)

    # ------------------------------------------------------------------------------ steps
    def fake_loss(self, x: torch.Tensor, z_c: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The auxiliary score's diffusion (eps-MSE) loss on student tokens ``x`` (detached)."""
        t = self._randint(0, 1000, len(x), gen, x.device)
        eps = self._rand(x.shape, gen, x.device)
        x_t = self.sqrt_ab.to(x.device)[t, None] * x + self.sigma.to(x.device)[t, None] * eps
        return (self.fake(x_t, t, z_c)[:, : self.C].float() - eps).square().mean()

    def draw_timesteps(self, rows: int, bsz: int, gen: torch.Generator, dev) -> torch.Tensor:
        """Generator-loss times for ``rows`` masked tokens (batch-major, ``rows // bsz`` per sample):
        one t per token (``huber_axis="token"``) or one t per sample, repeated over its tokens."""
        s = self.s
        n = rows if s.huber_axis == "token" else bsz
        t = self._randint(s.t_min, s.t_max + 1, n, gen, dev)
        return t if s.huber_axis == "token" else t.repeat_interleave(rows // bsz)

    def generator_loss(self, x, z_c, z_u, bsz, gen):
        t = self.draw_timesteps(len(x), bsz, gen, x.device)
        return self.generator_loss_at(x, z_c, z_u, bsz, t, self._rand(x.shape, gen, x.device))

    def generator_loss_at(self, x, z_c, z_u, bsz, t, eps):
        """The GSIM loss of the student tokens ``x`` [rows, C] at given times ``t`` [rows] and noise."""
        s, dev = self.s, x.device
        sigma = self.sigma.to(dev)[t, None]
        x_t = self.sqrt_ab.to(dev)[t, None] * x + sigma * eps
        out = self.teacher.diffloss.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([z_c, z_u]))
        eps_c, eps_u = out[:, : self.C].float().chunk(2)
        eps_teacher = eps_u + s.cfg * (eps_c - eps_u)        # MAR's CFG: cfg = 1 is the conditional eps
        self.fake.requires_grad_(False)
        eps_fake = self.fake(x_t, t, z_c)[:, : self.C].float()
        self.fake.requires_grad_(True)
        weight = sigma.squeeze(1) if s.time_weight == "sigma" else None
        if s.huber_axis == "token":
            loss = gsim_loss_eps(eps_fake, eps_teacher, eps, sigma, s.huber_r, -1, s.detach_dprime, weight)
        else:  # one norm over all masked tokens of a sample (rows are batch-major, equal count per sample)
            shape = (bsz, -1, self.C)
            t_s = t.reshape(bsz, -1)
            if not torch.equal(t_s, t_s[:, :1].expand_as(t_s)):
                raise ValueError("huber_axis='sample' needs one t per sample (a per-sample norm over tokens "
                                 "at different times is no score divergence)")
            sig_s = sigma.reshape(bsz, -1)[:, :1, None]       # [bsz, 1, 1]: the sample's one sigma_t
            w = None if weight is None else sig_s.reshape(bsz)
            loss = gsim_loss_eps(eps_fake.reshape(shape), eps_teacher.reshape(shape), eps.reshape(shape),
                                 sig_s, s.huber_r, (1, 2), s.detach_dprime, w)
        gap = (eps_teacher - eps_fake).square().sum(-1).sqrt().mean()
        return loss.mean(), {"score_gap": gap.item()}

    def step(self, step: int, gen: torch.Generator, update) -> dict:
        """One GSIM step: S_phi update(s) on the current student samples, then the student's update.
        Forward passes run under ``precision``'s autocast; each ``update`` (backward, step) outside it."""
        amp = functools.partial(autocast, self.precision, self.teacher.device)
        latents, labels = self.batches.sample(self.s.generator_optim.batch_size, gen, self.teacher.device)
        with amp():
            z_c, z_u, z_s, bsz = self.context(latents, labels, gen)
            noise = self._rand((len(z_c), self.C), gen, z_c.device)
            x = self.student.one_step(noise, z_s)
            fake_losses = [self.fake_loss(x.detach(), z_c, gen)]
        update("fake", fake_losses[0])
        for _ in range(self.s.fake_steps_per_gen - 1):
            with torch.no_grad(), amp():
                x2 = self.student.one_step(self._rand((len(z_c), self.C), gen, z_c.device), z_s)
            with amp():
                fake_losses.append(self.fake_loss(x2, z_c, gen))
            update("fake", fake_losses[-1])
        with amp():
            loss, info = self.generator_loss(x, z_c, z_u, bsz, gen)
        grad_norm = update("generator", loss)
        return {"gsim_loss": loss.item(), "fake_loss": sum(f.item() for f in fake_losses) / len(fake_losses),
                "grad_norm": grad_norm, "x_std": x.detach().std().item(), **info}

    def sample(self, step: int, shipped: dict) -> None:
        """A grid of the EMA student (``distill.sample_every``)."""
        student = self.shipped_student(shipped["generator"])
        grid_labels = torch.arange(min(16, self.teacher.config.class_num))
        res = sample_tokens(student, labels=grid_labels, num_iter=min(8, student.seq_len),
                            generator=torch.Generator().manual_seed(0), record_noise=False)
        save_grid(self.vae.decode_images(res.tokens), self.out_dir / "samples" / f"student_{step:06d}.png", nrow=8)

    def shipped_student(self, trained=None, merge: bool = True) -> MARVAL:
        """A copy of the student carrying ``trained`` (the shipped generator trainable, its EMA copy):
        the policy that gets saved and sampled; with LoRA, its adapters merged (``merge=False``: kept)."""
        out = copy.deepcopy(self.student).eval()
        if trained is not None:
            target = out if self.trainable is self.student else out.one_step
            target.load_state_dict(trained.state_dict())
        return lora.merged_copy(out) if self.use_lora and merge else out


def distill(teacher: MAR, vae, batches, section: DistillSection, out_dir: Path,
            progress: bool = True, resume_from: Path | None = None, precision: str = "fp32") -> tuple[MARVAL, dict]:
    """Run (or resume) GSIM distillation on ``batches`` (a :class:`LatentBatches`); writes
    ``out_dir/student`` (the EMA policy; rank 0 under torchrun, the global batch split over the ranks). ``resume_from``: a state file of another folder to continue
    (its log rows up to that step come along)."""
    distributed.check_divides(section.generator_optim.batch_size, "distill.generator_optim.batch_size")
    d = GSIMDistiller(teacher, section, precision)
    d.batches, d.vae, d.out_dir = batches, vae, Path(out_dir)
    torch.manual_seed(section.seed)
    shipped, metrics = run_loop(d, out_dir, generator=torch.Generator().manual_seed(section.seed),
                                log_every=section.log_every, checkpoint_every=section.checkpoint_every,
                                sample_every=section.sample_every, progress=progress, resume_from=resume_from)
    student = d.shipped_student(shipped["generator"], merge=False)
    if distributed.is_main() and d.use_lora:   # the adapter in peft's format beside the merged student
        lora.save_adapter(student, section.lora, Path(out_dir) / "adapter")
    student = lora.merged_copy(student) if d.use_lora else student
    if distributed.is_main():
        save_pretrained(student, Path(out_dir) / "student", metadata={"stage": "distill", **metrics})
    distributed.barrier()
    return student, metrics
