"""The page a person reads after (or during) an RL run: ``OUTPUT_DIR/report.html``, self-contained.

Built only from files in the output folder, so ``marval-rl report OUTPUT_DIR`` rebuilds it at any time
(the run writes it at every checkpoint and at the end):

    recipe.yaml                       the resolved recipe (run_record.py)
    metrics.jsonl                     one row per iteration: rollout rewards, gold, times, fixed-eval means
    eval/iter_XXXXX.safetensors       each fixed-eval point: images (uint8), per-sample scores, class ids
    eval/real.json                    the real-image ceiling of the same rewards (embedded default)
    grids/*.png                       labelled rollout grids;  summary.json: the run's summary, when done

The page: the fixed-eval summary (before -> after in units of the starting spread, gap to real images
closed, FID-proxy, diversity), reward and gold curves with the fixed-eval points, the before/after
sheet of the same prompts and seeds, a per-class table, the latest rollouts, the step-time split and
the settings. Figures are inlined as base64 PNGs.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from marval_rl import strict_json
from marval_rl.models.checkpoints import atomic_write
from marval_rl.rl.evaluation import EvalPoint, summarise

EVAL_DIR = "eval"
TIME_KEYS = ("time/sync", "time/rollout", "time/update", "time/worker_rollout", "time/worker_reward")


# --------------------------------------------------------------------------------------- eval points
def save_eval_point(out: Path, point: EvalPoint, class_ids: list[int], names: list[str]) -> Path:
    """``eval/iter_XXXXX.safetensors``: the point's images and scores, with the prompts' class ids."""
    tensors = {"images": point.images.contiguous(), "class_ids": torch.tensor(class_ids, dtype=torch.int64),
               **{f"score/{k}": v.detach().float().contiguous().cpu() for k, v in point.scores.items()}}
    meta = {"iteration": str(point.iteration), "names": strict_json.dumps([names[c] for c in class_ids]),
            "fid_proxy": strict_json.dumps(point.fid_proxy), "spread": strict_json.dumps(point.spread),
            "keys": strict_json.dumps(list(point.scores))}   # safetensors sorts tensor names; keep the metric order
    path = Path(out) / EVAL_DIR / f"iter_{point.iteration:05d}.safetensors"
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))
    return path


def load_eval_points(out: Path) -> list[tuple[EvalPoint, list[str]]]:
    """Every saved fixed-eval point, in iteration order, with the class name of each image."""
    from safetensors import safe_open

    points = []
    for path in sorted((Path(out) / EVAL_DIR).glob("iter_*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        scores = {k: t[f"score/{k}"] for k in json.loads(meta["keys"])}
        point = EvalPoint(int(meta["iteration"]), scores, t["images"], json.loads(meta["fid_proxy"]),
                          json.loads(meta["spread"]))
        points.append((point, json.loads(meta["names"])))
    return points


def save_real(out: Path, real: dict[str, float]) -> None:
    atomic_write(Path(out) / EVAL_DIR / "real.json", lambda p: Path(p).write_text(strict_json.dumps(real)))


# --------------------------------------------------------------------------------------- figures
def plot_curves(history: list[dict], eval_rows: list[dict], path: Path | None = None):
    """Left: each iteration's rollout means (noisy, one batch). Right: the fixed eval set, with markers.
    Returns the figure as PNG bytes (and writes it to ``path`` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if eval_rows else 1, figsize=(11 if eval_rows else 6, 3.5), dpi=120,
                             squeeze=False)
    its = [h["iteration"] for h in history]
    ax = axes[0, 0]
    for k in sorted({k for h in history for k in h if k.startswith(("reward/", "gold/"))}):
        ax.plot(its, [h.get(k, float("nan")) for h in history], label=k,
                linestyle="--" if k.startswith("gold/") else "-")
    ax.set(xlabel="iteration", ylabel="mean reward (rollout batch)", title="rollouts")
    if history:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    if eval_rows:
        ax = axes[0, 1]
        for k in sorted({k for h in eval_rows for k in h if k.startswith(("eval/reward/", "eval/gold/"))}):
            pts = [(h["iteration"], h[k]) for h in eval_rows if k in h]
            ax.plot(*zip(*pts), marker="o", label=k[len("eval/"):], linestyle="--" if "/gold/" in k else "-")
        ax.set(xlabel="iteration", ylabel="mean over the fixed eval set", title="fixed eval set")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    if path is not None:
        atomic_write(Path(path), lambda p: Path(p).write_bytes(buf.getvalue()))
    return buf.getvalue()


def _png(data: bytes, alt: str, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    return (f'<img alt="{html.escape(alt)}"{style} src="data:image/png;base64,'
            f'{base64.b64encode(data).decode()}">')


def _comparison_png(first: EvalPoint, last: EvalPoint, names: list[str]) -> bytes:
    import tempfile

    from marval_rl.eval.images import save_labelled_comparison

    keys = [k for k in first.scores if k != "reward/total"][:2]
    short = lambda k: k.split("/")[-1]  # noqa: E731
    with tempfile.TemporaryDirectory() as d:
        path = save_labelled_comparison(first.images, last.images, names, Path(d) / "c.png",
                                        before_scores={short(k): first.scores[k].tolist() for k in keys},
                                        after_scores={short(k): last.scores[k].tolist() for k in keys},
                                        scale=3, columns=8,
                                        title=f"fixed eval set: iteration {first.iteration} -> {last.iteration}")
        return path.read_bytes()


# --------------------------------------------------------------------------------------- tables
def _fmt(v) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def eval_summary_rows(first: EvalPoint, last: EvalPoint | None, real: dict) -> list[list]:
    """metric | before | after | real | gain (sigma of the start) | gap to real closed."""
    s = summarise(first, last, real)
    rows = []
    for k, before in s["eval_first"].items():
        rows.append([k, before, s["eval_last"].get(k), s["eval_real"].get(k),
                     (s.get("eval_gain_sigma") or {}).get(k), (s.get("eval_gap_closed") or {}).get(k)])
    if first.fid_proxy is not None:
        rows.append(["fid_proxy (lower is better)", first.fid_proxy, last.fid_proxy if last else None, None, None, None])
    if last is not None and s.get("diversity_last") is not None and math.isfinite(s["diversity_last"]):
        rows.append(["diversity (1 = as at the start)", 1.0, s["diversity_last"], None, None, None])
    return rows


def per_class_rows(first: EvalPoint, last: EvalPoint | None, names: list[str]) -> tuple[list[str], list[list]]:
    keys = list(first.scores)
    header = ["class", "images"] + [f"{k} {w}" for k in keys for w in (("before", "after") if last else ("before",))]
    rows = []
    for name in dict.fromkeys(names):
        idx = torch.tensor([i for i, n in enumerate(names) if n == name])
        row = [name, len(idx)]
        for k in keys:
            row.append(first.scores[k][idx].float().mean().item())
            if last is not None:
                row.append(last.scores[k][idx].float().mean().item())
        rows.append(row)
    return header, rows


def time_rows(history: list[dict]) -> list[list]:
    rows = []
    for k in TIME_KEYS:
        vals = [h[k] for h in history if isinstance(h.get(k), (int, float))]
        if vals:
            rows.append([k.split("/", 1)[1], statistics.median(vals), sum(vals)])
    return rows


# --------------------------------------------------------------------------------------- the page
CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}thead{background:#f3f3f3}
img{image-rendering:pixelated;max-width:100%}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.8em}
.note{color:#666;font-size:.9em}"""


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:   # a half-written last line of a killed run (or not a log at all)
            continue
        if isinstance(row, dict) and "iteration" in row:
            out.append(row)
    return out


def build_report(out: str | Path) -> Path:
    """Write ``OUTPUT_DIR/report.html`` from the folder's files; returns its path."""
    out = Path(out)
    if not (out / "metrics.jsonl").is_file() and not (out / EVAL_DIR).is_dir():
        raise FileNotFoundError(f"{out} holds no RL run (no metrics.jsonl, no eval/): nothing to report")
    history = _read_jsonl(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else None
    real = json.loads((out / EVAL_DIR / "real.json").read_text()) if (out / EVAL_DIR / "real.json").is_file() else {}
    points = load_eval_points(out)
    recipe_text = (out / "recipe.yaml").read_text() if (out / "recipe.yaml").is_file() else "(no recipe.yaml)"
    done = summary is not None
    last_it = history[-1]["iteration"] if history else 0
    title = f"marval-rl train: {out.name}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{"finished" if done else "in progress"}: {last_it} iteration(s) logged; '
             f'algorithm {html.escape(str((summary or {}).get("algorithm", _recipe_value(recipe_text, "algorithm"))))}'
             f'. Rebuild with <code>marval-rl report {html.escape(str(out))}</code>.</p>']

    first, first_names = points[0] if points else (None, [])
    last = points[-1][0] if len(points) > 1 else None
    parts.append("<h2>Fixed evaluation set</h2>")
    if first is None:
        parts.append('<p class="note">no fixed-eval point yet (train.eval_per_class = 0 turns it off).</p>')
    else:
        parts.append(f'<p class="note">{len(first_names)} images: every class x train.eval_per_class, fixed seeds, '
                     f'deterministic policy; before = iteration {first.iteration}, after = iteration '
                     f'{last.iteration if last else "&ndash;"}. Gain is in units of the per-sample std at the start; '
                     f'gap closed = (after - before) / (real - before).</p>')
        parts.append(_table(["metric", "before", "after", "real images", "gain (sigma)", "gap closed"],
                            eval_summary_rows(first, last, real), "summary"))
    eval_rows = [{k: v for k, v in h.items() if k == "iteration" or k.startswith("eval/")}
                 for h in history if any(k.startswith("eval/") for k in h)]
    if first is not None:
        eval_rows = [first.log_row(first)] + [r for r in eval_rows if r["iteration"] != first.iteration]
        if last is not None and all(r["iteration"] != last.iteration for r in eval_rows):
            eval_rows.append(last.log_row(first))
    parts.append("<h2>Rewards</h2>")
    parts.append('<p class="note">solid: optimised rewards; dashed: gold (held-out, never optimised).</p>')
    parts.append(_png(plot_curves(history, eval_rows), "reward and gold curves"))
    if first is not None and last is not None:
        parts.append("<h2>Before / after: the same prompts and seeds</h2>")
        parts.append(_png(_comparison_png(first, last, first_names), "before and after"))
        header, rows = per_class_rows(first, last, first_names)
        parts.append("<h2>Per class</h2>" + _table(header, rows, "per-class"))
    elif first is not None:
        header, rows = per_class_rows(first, None, first_names)
        parts.append("<h2>Per class (start)</h2>" + _table(header, rows, "per-class"))
    grids = sorted((out / "grids").glob("*.png")) if (out / "grids").is_dir() else []
    if grids:
        latest = max(grids, key=lambda p: p.stat().st_mtime)
        parts.append(f"<h2>Latest rollouts ({html.escape(latest.stem)})</h2>")
        parts.append(_png(latest.read_bytes(), "latest rollouts"))
    rows = time_rows(history)
    if rows:
        parts.append("<h2>Step time</h2>" + _table(["part", "median s / iteration", "total s"], rows, "times"))
    parts.append(f"<h2>Settings</h2><pre>{html.escape(recipe_text)}</pre>")
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    path = out / "report.html"
    atomic_write(path, lambda p: Path(p).write_text(page, encoding="utf-8"))
    return path


def _recipe_value(text: str, key: str) -> str:
    for line in text.splitlines():
        if line.strip().startswith(f"{key}:"):
            return line.split(":", 1)[1].strip()
    return "?"
