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
Checkpoints hold student, S_phi, both optimisers, the EMA, the generator and the step: a killed run
resumes exactly. The EMA student is what gets saved as the policy.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from marval_rl.config import DistillSection
from marval_rl.distill.gsim import gsim_loss_eps
from marval_rl.eval.images import save_grid
from marval_rl.models.checkpoints import (atomic_write, load_state_dict_strict, remove_stale_temps, save_pretrained,
                                          torch_load_safely)
from marval_rl.models.mar import MAR
from marval_rl.models.one_step import MARVAL
from marval_rl.sampling import sample_tokens
from marval_rl.training import EMA, lr_at, make_optimizer, set_lr, sync_log


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


class GSIMDistiller:
    """Holds teacher (frozen), student, auxiliary score and their optimisers; one call = one step."""

    def __init__(self, teacher: MAR, section: DistillSection):
        if type(teacher) is not MAR:
            raise ValueError(f"the teacher must be a MAR with its diffusion head, got {type(teacher).__name__} "
                            f"(a MARVAL student checkpoint was given where a teacher is expected?)")
        check_section(section)
        self.s, self.teacher = section, teacher.eval().requires_grad_(False)
        self.student = MARVAL.from_teacher(teacher, section.init_timestep).train()
        self.student.requires_grad_(False)
        self.trainable = self.student if section.train_backbone else self.student.one_step
        self.trainable.requires_grad_(True)
        self.fake = copy.deepcopy(teacher.diffloss.net).train().requires_grad_(True)
        self.opt_g = make_optimizer(self.trainable, section.generator_optim)
        self.opt_f = make_optimizer(self.fake, section.fake_optim)
        # EMA over what trains only (for MAR-B the frozen backbone is 170M parameters).
        self.ema = EMA(self.trainable, section.generator_optim.ema) if section.generator_optim.ema > 0 else None
        tables = teacher.diffloss.train_diffusion
        self.sqrt_ab = tables.sqrt_alphas_cumprod.float()
        self.sigma = tables.sqrt_one_minus_alphas_cumprod.float()
        self.C = teacher.token_embed_dim

    # --------------------------------------------------------------------------- context
    def context(self, latents: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        t = self.teacher
        tokens = t.patchify(latents)
        orders = t.sample_orders(len(labels), gen)
        rate = t.sample_mask_rate(gen, self.s.mask_ratio_min)
        mask = t.mask_from_orders(orders, max(1, math.ceil(t.seq_len * rate)))
        with torch.no_grad():
            z_c, z_u = t.guided_condition(tokens, mask, labels)
        rows = mask.bool().nonzero(as_tuple=True)
        z_c, z_u = z_c[rows], z_u[rows]
        z_s = self.student.condition(tokens, mask, labels)[rows] if self.s.train_backbone else z_c
        return z_c, z_u, z_s, len(labels)

    def _rand(self, shape, gen, dev):
        return torch.randn(shape, generator=gen, device=gen.device).to(dev)

    # ------------------------------------------------------------------------------ steps
    def fake_step(self, x: torch.Tensor, z_c: torch.Tensor, gen: torch.Generator) -> float:
        t = torch.randint(0, 1000, (len(x),), generator=gen, device=gen.device).to(x.device)
        eps = self._rand(x.shape, gen, x.device)
        x_t = self.sqrt_ab.to(x.device)[t, None] * x + self.sigma.to(x.device)[t, None] * eps
        loss = (self.fake(x_t, t, z_c)[:, : self.C] - eps).square().mean()
        self.opt_f.zero_grad(set_to_none=True)
        loss.backward()
        if self.s.fake_optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.fake.parameters(), self.s.fake_optim.grad_clip)
        self.opt_f.step()
        return loss.item()

    def draw_timesteps(self, rows: int, bsz: int, gen: torch.Generator, dev) -> torch.Tensor:
        """Generator-loss times for ``rows`` masked tokens (batch-major, ``rows // bsz`` per sample):
        one t per token (``huber_axis="token"``) or one t per sample, repeated over its tokens."""
        s = self.s
        n = rows if s.huber_axis == "token" else bsz
        t = torch.randint(s.t_min, s.t_max + 1, (n,), generator=gen, device=gen.device).to(dev)
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
        eps_c, eps_u = out[:, : self.C].chunk(2)
        eps_teacher = eps_u + s.cfg * (eps_c - eps_u)        # MAR's CFG: cfg = 1 is the conditional eps
        self.fake.requires_grad_(False)
        eps_fake = self.fake(x_t, t, z_c)[:, : self.C]
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

    def step(self, step: int, latents, labels, gen) -> dict:
        set_lr(self.opt_g, lr_at(step, self.s.generator_optim))
        set_lr(self.opt_f, lr_at(step, self.s.fake_optim))
        z_c, z_u, z_s, bsz = self.context(latents, labels, gen)
        noise = self._rand((len(z_c), self.C), gen, z_c.device)
        x = self.student.one_step(noise, z_s)
        fake_losses = [self.fake_step(x.detach(), z_c, gen)]
        for _ in range(self.s.fake_steps_per_gen - 1):
            with torch.no_grad():
                x2 = self.student.one_step(self._rand((len(z_c), self.C), gen, z_c.device), z_s)
            fake_losses.append(self.fake_step(x2, z_c, gen))
        loss, info = self.generator_loss(x, z_c, z_u, bsz, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"GSIM loss is {loss.item()} at step {step}")
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), self.s.generator_optim.grad_clip) \
            if self.s.generator_optim.grad_clip > 0 else torch.tensor(0.0)
        self.opt_g.step()
        if self.ema is not None:
            self.ema.update(self.trainable)
        return {"gsim_loss": loss.item(), "fake_loss": sum(fake_losses) / len(fake_losses),
                "grad_norm": float(gnorm), "x_std": x.detach().std().item(), **info}

    def shipped_student(self) -> MARVAL:
        """A copy of the student carrying the EMA weights: the policy that gets saved and sampled."""
        out = copy.deepcopy(self.student).eval()
        if self.ema is not None:
            self.ema.copy_to(out if self.s.train_backbone else out.one_step)
        return out

    # ------------------------------------------------------------------------- checkpoints
    def save_state(self, path: Path, step: int, gen: torch.Generator):
        state = {"step": step, "student": self.student.state_dict(), "fake": self.fake.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "opt_f": self.opt_f.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else {},
                 "generator": gen.get_state(), "torch_rng": torch.get_rng_state()}
        atomic_write(path, lambda p: torch.save(state, p))

    def load_state(self, path: Path, gen: torch.Generator) -> int:
        state = torch_load_safely(path)
        load_state_dict_strict(self.student, state["student"], f"{path}['student']")
        load_state_dict_strict(self.fake, state["fake"], f"{path}['fake']")
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_f.load_state_dict(state["opt_f"])
        if self.ema is not None and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])


def distill(teacher: MAR, vae, batches, section: DistillSection, out_dir: Path,
            progress: bool = True, resume_from: Path | None = None) -> tuple[MARVAL, dict]:
    """Run (or resume) GSIM distillation on ``batches`` (a :class:`LatentBatches`); writes
    ``out_dir/student`` (the EMA policy). ``resume_from``: a state file of another folder to continue
    (its log rows up to that step come along)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    d = GSIMDistiller(teacher, section)
    gen = torch.Generator().manual_seed(section.seed)
    torch.manual_seed(section.seed)
    state_path, log_path = out_dir / "distill_train_state.pt", out_dir / "distill_metrics.jsonl"
    remove_stale_temps(out_dir)
    source = Path(resume_from) if resume_from is not None else (state_path if state_path.is_file() else None)
    start = d.load_state(source, gen) if source is not None else 0
    if source is not None and source.parent.resolve() != out_dir.resolve() and \
            (source.parent / log_path.name).is_file():
        shutil.copyfile(source.parent / log_path.name, log_path)
    sync_log(log_path, "step", start)
    if start:
        print(f"[distill] resuming from step {start} ({source})")
    opt = section.generator_optim
    dev = teacher.device
    grid_labels = torch.arange(min(16, teacher.config.class_num))
    metrics, t0 = {}, time.perf_counter()
    bar = tqdm(range(start, opt.steps), initial=start, total=opt.steps, desc="distill", disable=not progress)
    for step in bar:
        latents, labels = batches.sample(opt.batch_size, gen, dev)
        info = d.step(step, latents, labels, gen)
        done = step + 1
        if done % section.log_every == 0 or done == opt.steps:
            metrics = {"step": done, "seconds": time.perf_counter() - t0, **info}
            bar.set_postfix(gsim=f"{info['gsim_loss']:.3f}", fake=f"{info['fake_loss']:.3f}")
            with open(log_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        if section.sample_every and (done % section.sample_every == 0 or done == opt.steps):
            student = d.shipped_student()
            with torch.no_grad():
                res = sample_tokens(student, labels=grid_labels, num_iter=min(8, student.seq_len),
                                    generator=torch.Generator().manual_seed(0), record_noise=False)
                save_grid(vae.decode_images(res.tokens),
                          out_dir / "samples" / f"student_{done:06d}.png", nrow=8)
        if section.checkpoint_every and (done % section.checkpoint_every == 0 or done == opt.steps):
            d.save_state(state_path, done, gen)
    student = d.shipped_student()
    save_pretrained(student, out_dir / "student", metadata={"stage": "distill", **metrics})
    return student, metrics
