"""Weights & Biases for ``marval-rl train`` (``train.wandb: offline | online``; the ``wandb`` extra).

wandb's own conventions: the run is named after the output folder (or ``train.wandb_name``), grouped
by ``train.wandb_group`` and tagged with the algorithm and the rewards; its id is kept in the run state
(``rl_state.pt``), so a resumed run continues the same wandb run (``resume="allow"``). Logged: every
iteration's metrics; at grid iterations the labelled grid and a table of prompt / image / rewards; at
the end the fixed-eval figures before and after in the summary, the before/after sheet, and the final
policy as a ``model`` artifact.
"""
from __future__ import annotations

import secrets
from pathlib import Path


def _short(name: str) -> str:
    """A tag from a reward or rule name: 'path/to/file.py:Class' -> 'Class'."""
    return name.rpartition(":")[2] or name


class WandbRun:
    def __init__(self, out: Path, recipe, run_id: str | None = None):
        s = recipe.train
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"train.wandb={s.wandb} needs wandb, which is not installed: "
                              f"pip install 'marval-rl[wandb]'") from e
        from omegaconf import OmegaConf

        self.wandb = wandb
        self.id = run_id or secrets.token_hex(4)   # wandb ids: lowercase letters and digits
        self.run = wandb.init(project=s.wandb_project, name=s.wandb_name or Path(out).resolve().name,
                              group=s.wandb_group or None, tags=[_short(s.algorithm), *(_short(r.name) for r in s.rewards)],
                              id=self.id, resume="allow", mode=s.wandb, dir=str(out),
                              config=OmegaConf.to_container(OmegaConf.structured(recipe)))

    def log(self, metrics: dict, step: int, grid: Path | None = None, batches=None, names=None) -> None:
        payload = dict(metrics)
        if grid is not None:
            payload["rollouts/grid"] = self.wandb.Image(str(grid), caption=f"rollouts of iteration {step}")
        if batches is not None:
            payload["rollouts/table"] = self.table(batches, names)
        self.run.log(payload, step=step)

    def table(self, batches, names: list[str]):
        """One row per rollout image: class, prompt, the image (captioned with its prompt), every reward."""
        keys = list(batches[0].rewards.per_sample())
        table = self.wandb.Table(columns=["class", "prompt", "image", *keys])
        for b in batches:
            values = b.rewards.per_sample()
            for i, (c, prompt) in enumerate(zip(b.class_ids.tolist(), b.prompts)):
                img = b.images[i].permute(1, 2, 0).numpy()
                table.add_data(names[c], prompt, self.wandb.Image(img, caption=prompt),
                               *(float(values[k][i]) for k in keys))
        return table

    def finish(self, summary: dict, policy_dir: Path | None = None, before_after: Path | None = None) -> None:
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        for block in ("eval_first", "eval_last", "eval_real", "eval_gain_sigma", "eval_gap_closed"):
            for k, v in (summary.get(block) or {}).items():
                if isinstance(v, (int, float)):
                    flat[f"{block}/{k}"] = v
        for k in ("fid_proxy_first", "fid_proxy_last", "diversity_last"):
            if isinstance(summary.get(k), (int, float)):
                flat[k] = summary[k]
        self.run.summary.update(flat)
        if before_after is not None and Path(before_after).is_file():
            self.run.log({"eval/before_after": self.wandb.Image(str(before_after),
                                                                caption="fixed eval set: before | after")})
        if policy_dir is not None:
            art = self.wandb.Artifact(f"policy-{self.id}", type="model",
                                      metadata={k: summary.get(k) for k in ("algorithm", "iterations")})
            art.add_dir(str(policy_dir))
            self.run.log_artifact(art)
        self.run.finish()

