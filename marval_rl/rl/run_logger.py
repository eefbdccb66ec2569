"""Run logs of ``marval-rl train``: JSONL metrics, image grids, reward curve, optional wandb, summary."""
from __future__ import annotations

from pathlib import Path

import torch

from marval_rl import strict_json
from marval_rl.models.checkpoints import atomic_write


class RunLogger:
    def __init__(self, out: Path, recipe, names: list[str], history: list[dict] = (), wandb_id: str | None = None):
        """``names``: class id -> entity name (grid labels). ``history``: the rows of the state the run
        resumes from (none: a fresh start); the log is rewritten from them, so it holds each iteration
        once, agrees with the state, and a fresh start never appends to an old log. ``wandb_id``: the
        wandb run to continue (from the state)."""
        self.out, self.recipe, self.names = Path(out), recipe, names
        self.metrics_path = self.out / "metrics.jsonl"
        rows = "".join(strict_json.dumps(h) + "\n" for h in history)
        atomic_write(self.metrics_path, lambda p: Path(p).write_text(rows))
        self.wandb = None
        if recipe.train.wandb != "off":
            from marval_rl.rl.tracking import WandbRun

            self.wandb = WandbRun(self.out, recipe, wandb_id)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(self, metrics: dict, batches=None):
        with open(self.metrics_path, "a") as f:
            f.write(strict_json.dumps(metrics) + "\n")
        path = None
        if batches is not None:
            from marval_rl.eval.images import save_labelled_grid

            images = torch.cat([b.images for b in batches])
            labels = [self.names[int(c)] for b in batches for c in b.class_ids]
            path = save_labelled_grid(images, labels, self.out / "grids" / f"iter_{metrics['iteration']:05d}.png",
                                      scale=3, columns=8, title=f"rollouts of iteration {metrics['iteration']}")
        if self.wandb is not None:
            self.wandb.log(metrics, int(metrics["iteration"]), grid=path, batches=batches, names=self.names)

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
        from marval_rl.rl.report import plot_curves

        path = self.out / "reward_curve.png"
        plot_curves(history, list(eval_history), path)
        return path

    # ------------------------------------------------------------------ the report's inputs
    def eval_point(self, point, class_ids: list[int]) -> None:
        from marval_rl.rl.report import save_eval_point

        save_eval_point(self.out, point, class_ids, self.names)

    def eval_real(self, real: dict) -> None:
        from marval_rl.rl.report import save_real

        if real:
            save_real(self.out, real)

    def report(self) -> Path:
        from marval_rl.rl.report import build_report

        return build_report(self.out)

    def finish(self, history: list[dict], batch_rows: list[dict] | None, summary: dict, first=None, last=None,
               real=None):
        if history:
            summary["reward_curve"] = str(self.reward_curve(history, summary.get("eval_history", [])))
        atomic_write(self.out / "summary.json", lambda p: Path(p).write_text(strict_json.dumps(summary, indent=1)))
        summary["report"] = str(self.report())
        print()
        if last is not None:
            from marval_rl.rl.report import eval_summary_rows

            n = len(first.images) if first.images is not None else 0
            print(f"fixed eval set ({n} images, fixed prompts and seeds): iteration {first.iteration} -> "
                  f"{last.iteration}; gain in units of the starting per-sample std")
            print("| metric | before | after | real images | gain (sigma) | gap closed |")
            print("|---|---|---|---|---|---|")
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            for r in eval_summary_rows(first, last, real or {}):
                print("| " + " | ".join([str(r[0])] + [fmt(v) for v in r[1:]]) + " |")
        elif batch_rows:
            print("rollout batches (one batch each: noisy; set train.eval_per_class for a fixed eval set)")
            print("| metric | first | last | best |")
            print("|---|---|---|---|")
            for r in batch_rows:
                print(f"| {r['metric']} | {r['first']:.4f} | {r['last']:.4f} | {r['best']:.4f} |")
        if self.wandb is not None:
            self.wandb.finish(summary, summary.get("policy"), summary.get("before_after"))
        print(strict_json.dumps(summary))
