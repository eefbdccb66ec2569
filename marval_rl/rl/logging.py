"""Run logs of ``marval-rl train``: JSONL metrics, image grids, reward curve, optional wandb, summary."""
from __future__ import annotations

import json
from pathlib import Path

import torch


class RunLogger:
    def __init__(self, out: Path, recipe, resume: bool = False):
        self.out, self.recipe = Path(out), recipe
        self.metrics_path = self.out / "metrics.jsonl"
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()
        self.wandb = None
        mode = recipe.train.wandb
        if mode != "off":
            try:
                import wandb
            except ImportError as e:
                raise ImportError("train.wandb is set but wandb is not installed: pip install 'marval-rl[wandb]'") from e
            from omegaconf import OmegaConf

            self.wandb = wandb.init(project="marval-rl", mode=mode, dir=str(self.out),
                                    config=OmegaConf.to_container(OmegaConf.structured(recipe)))

    def log(self, metrics: dict, batches=None):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        payload = dict(metrics)
        if batches is not None:
            from marval_rl.eval.images import save_grid

            images = torch.cat([b.images for b in batches]).float() / 255
            path = save_grid(images, self.out / "grids" / f"iter_{metrics['iteration']:05d}.png", nrow=8)
            if self.wandb is not None:
                import wandb

                payload["rollouts"] = wandb.Image(str(path))
        if self.wandb is not None:
            self.wandb.log(payload, step=int(metrics["iteration"]))

    def reward_curve(self, history: list[dict]) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        its = [h["iteration"] for h in history]
        for k in sorted({k for h in history for k in h if k.startswith(("reward/", "gold/"))}):
            ax.plot(its, [h.get(k, float("nan")) for h in history], label=k,
                    linestyle="--" if k.startswith("gold/") else "-")
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean reward")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / "reward_curve.png"
        fig.savefig(path)
        plt.close(fig)
        return path

    def finish(self, history: list[dict], rows: list[dict], summary: dict):
        if history:
            summary["reward_curve"] = str(self.reward_curve(history))
        print()
        print("| metric | first | last | best |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['metric']} | {r['first']:.4f} | {r['last']:.4f} | {r['best']:.4f} |")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb.finish()
        print(json.dumps(summary))
