"""Run logs of ``marval-rl train``: JSONL metrics, image grids, reward curve, optional wandb, summary."""
from __future__ import annotations

import json
from pathlib import Path

import torch


class RunLogger:
    def __init__(self, out: Path, recipe, start: int = 0):
        """``start``: the iteration the run (re)starts at; the log is cut back to it (``sync_log``)."""
        from marval_rl.training import sync_log

        self.out, self.recipe = Path(out), recipe
        self.metrics_path = self.out / "metrics.jsonl"
        sync_log(self.metrics_path, "iteration", start)
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

    def before_after(self, first, last, labels: list[str]) -> Path:
        """The fixed eval prompts and seeds before and after RL, side by side, labelled and upscaled."""
        from marval_rl.eval.images import save_labelled_comparison

        keys = [k for k in first.scores if k != "reward/total"][:2]
        short = lambda k: k.split("/")[-1]  # noqa: E731
        before = {short(k): first.scores[k].tolist() for k in keys}
        after = {short(k): last.scores[k].tolist() for k in keys}
        return save_labelled_comparison(first.images, last.images, labels, self.out / "before_after.png",
                                        before_scores=before, after_scores=after, scale=3, columns=8)

    def reward_curve(self, history: list[dict], eval_history: list[dict] = ()) -> Path:
        """Left: each iteration's rollout means. Right: the fixed eval set (the judge), with markers."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2 if eval_history else 1, figsize=(11 if eval_history else 6, 3.5), dpi=120,
                                 squeeze=False)
        its = [h["iteration"] for h in history]
        ax = axes[0, 0]
        for k in sorted({k for h in history for k in h if k.startswith(("reward/", "gold/"))}):
            ax.plot(its, [h.get(k, float("nan")) for h in history], label=k,
                    linestyle="--" if k.startswith("gold/") else "-")
        ax.set(xlabel="iteration", ylabel="mean reward (rollout batch)", title="rollouts")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        if eval_history:
            ax = axes[0, 1]
            keys = sorted({k for h in eval_history for k in h if k.startswith(("eval/reward/", "eval/gold/"))})
            for k in keys:
                pts = [(h["iteration"], h[k]) for h in eval_history if k in h]
                ax.plot(*zip(*pts), marker="o", label=k[len("eval/"):],
                        linestyle="--" if "/gold/" in k else "-")
            ax.set(xlabel="iteration", ylabel="mean over the fixed eval set", title="fixed eval set")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out / "reward_curve.png"
        fig.savefig(path)
        plt.close(fig)
        return path

    def finish(self, history: list[dict], rows: list[dict], summary: dict):
        if history:
            summary["reward_curve"] = str(self.reward_curve(history, summary.get("eval_history", [])))
        print()
        print("| metric | first | last | best |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['metric']} | {r['first']:.4f} | {r['last']:.4f} | {r['best']:.4f} |")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb.finish()
        print(json.dumps(summary))
