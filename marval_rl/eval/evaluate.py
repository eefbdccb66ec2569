"""``marval-rl evaluate``: generate a fixed, class-balanced list of images and score them.

Metrics (``evaluate.metrics``): FID-proxy (Frechet distance on the embedded classifier's features against
shipped reference statistics of held-out renders), classifier accuracy (the prompted class is the top-1
class), FID and Inception Score with the standard 2015-12-05 Inception against ImageNet reference
statistics (eval/inception.py), and any reward of the registry as its mean over the images. Generation is
chunked, resumable and sharded over ranks (eval/sharded.py); the printed table has the paper's columns.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from marval_rl import strict_json
from marval_rl.sampling import sample_tokens


@torch.no_grad()
def generate_images(model, vae, labels: list[int], *, num_iter: int, cfg: float, cfg_schedule: str,
                    temperature: float, token_sampler, batch_size: int, seed: int,
                    progress: bool = True) -> tuple[torch.Tensor, float]:
    """Images in [0, 1] for ``labels`` (one per entry) and the seconds spent generating them."""
    generator = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for i in tqdm(range(0, len(labels), batch_size), desc="generating", disable=not progress):
        res = sample_tokens(model, labels=labels[i:i + batch_size], num_iter=num_iter, cfg=cfg,
                            cfg_schedule=cfg_schedule, temperature=temperature, generator=generator,
                            token_sampler=token_sampler, record_noise=False)
        out.append(vae.decode_images(res.tokens).cpu())
    return torch.cat(out), time.perf_counter() - t0


@torch.no_grad()
def score_images(images: torch.Tensor, labels: list[int], classifier, fid) -> dict:
    logits = torch.cat([classifier(images[i:i + 256]) for i in range(0, len(images), 256)])
    acc = (logits.argmax(1) == torch.tensor(labels)).float().mean().item()
    return {"fid_proxy": float(fid.score(images)), "classifier_acc": acc}


def format_table(rows: list[dict], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "---|" * len(columns)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join([head, sep] + ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows])


# --------------------------------------------------------------------------- the metric set of `evaluate`
INCEPTION_METRICS = ("fid", "inception_score")
BUILTIN_METRICS = ("fid_proxy", "accuracy", *INCEPTION_METRICS)
# the table's column for each summary key, in the paper's order (FID, IS, time), then the embedded metrics
COLUMNS = {"fid": "FID", "inception_score": "IS", "s_per_image": "s/image", "fid_proxy": "FID-proxy",
           "classifier_acc": "accuracy"}


class Scorers:
    """Per-image outputs of the requested metrics for one chunk of images, and the metrics from all of
    them. Everything a metric needs later is kept per image (features, logits, scores), so chunks made
    by different ranks or runs concatenate into exactly what one pass would hold.

    ``rewards``: name -> built reward (marval_rl.rewards registry), scored against
    ``prompt(class_names[label], prompt_template)``; reported as its mean over the images."""

    def __init__(self, metrics: list[str], *, classifier=None, fid_proxy=None, inception=None, reference=None,
                 rewards: dict | None = None, class_names=None, prompt_template: str = "photo",
                 is_splits: int = 10, batch_size: int = 64):
        self.metrics, self.classifier, self.fid_proxy = list(metrics), classifier, fid_proxy
        self.inception, self.reference, self.rewards = inception, reference, dict(rewards or {})
        self.class_names, self.template = class_names, prompt_template
        self.is_splits, self.batch_size = is_splits, batch_size

    @torch.no_grad()
    def outputs(self, images: torch.Tensor, labels: list[int]) -> dict[str, torch.Tensor]:
        from marval_rl.eval.fid import FeatureExtractor

        out = {"labels": torch.tensor(labels, dtype=torch.int64)}
        bs, m = self.batch_size, set(self.metrics)
        if "fid_proxy" in m:
            extract = FeatureExtractor(self.classifier)
            out["classifier_features"] = torch.cat([extract(images[i:i + bs]).float().cpu()
                                                    for i in range(0, len(images), bs)])
        if "accuracy" in m:
            self.classifier.eval()
            out["classifier_pred"] = torch.cat([self.classifier(images[i:i + bs]).argmax(1).cpu()
                                                for i in range(0, len(images), bs)])
        if m & set(INCEPTION_METRICS):
            from marval_rl.eval.inception import inception_outputs

            pool, logits = inception_outputs(self.inception, images, bs)
            if "fid" in m:
                out["pool3"] = pool
            if "inception_score" in m:
                out["logits_unbiased"] = logits
        if self.rewards:
            from marval_rl.data.prompts import prompt

            prompts = [prompt(self.class_names[c], self.template) for c in labels]
            meta = {"class_ids": out["labels"]}
            for name, reward in self.rewards.items():
                out[f"reward.{name}"] = torch.cat([
                    reward(images[i:i + bs], prompts[i:i + bs], {"class_ids": meta["class_ids"][i:i + bs]})
                    .detach().double().cpu() for i in range(0, len(images), bs)])
        return out

    def summarize(self, outputs: dict[str, torch.Tensor]) -> dict:
        from marval_rl.eval.fid import frechet_distance

        res, m = {}, set(self.metrics)
        if "fid" in m:
            from marval_rl.eval.inception import fid_from_features

            res["fid"] = fid_from_features(outputs["pool3"], self.reference)
        if "inception_score" in m:
            from marval_rl.eval.inception import inception_score

            res["inception_score"], res["inception_score_std"] = inception_score(outputs["logits_unbiased"],
                                                                                 self.is_splits)
        if "fid_proxy" in m:
            f = outputs["classifier_features"].double()
            mu, sigma = f.mean(0), torch.cov(f.T)   # unbiased, as the stored reference sigma
            res["fid_proxy"] = frechet_distance(mu, sigma, self.fid_proxy.stats["mu"], self.fid_proxy.stats["sigma"])
        if "accuracy" in m:
            res["classifier_acc"] = (outputs["classifier_pred"] == outputs["labels"]).double().mean().item()
        for name in self.rewards:
            res[name] = outputs[f"reward.{name}"].mean().item()
        return res


def paper_table(row: dict) -> str:
    """The run's row under the paper's columns (FID, IS, s/image; then the embedded and reward metrics)."""
    keys = ["generator", "head", "K", "cfg", "images"] + [k for k in ("fid", "inception_score", "s_per_image",
                                                                      "fid_proxy", "classifier_acc") if k in row]
    keys += [k for k in row.get("rewards", [])]
    return format_table([{COLUMNS.get(k, k): row[k] for k in keys}], [COLUMNS.get(k, k) for k in keys])


def build_scorers(recipe, rewards: dict | None = None, class_names=None) -> tuple[Scorers, dict]:
    """The evaluators the recipe's metrics need, loaded and checked (on this rank's device), and the files
    they came from (named in the run's JSON). ``rewards``: the reward metrics, built by the caller (rewards
    sit above eval in the layers), and ``class_names`` for their prompts."""
    from marval_rl.models.checkpoints import load_pretrained

    e, device = recipe.evaluate, torch.device(recipe.device)
    m, kw, files = set(e.metrics), {}, {}
    if m & {"fid_proxy", "accuracy"}:
        kw["classifier"] = load_pretrained(e.classifier, expected="classifier", map_location=device)
        files["classifier"] = str(e.classifier)
    if "fid_proxy" in m:
        from marval_rl.eval.fid import FIDProxy

        kw["fid_proxy"] = FIDProxy(kw["classifier"], e.fid_stats)   # checks dims and the classifier fingerprint
        files["fid_stats"] = str(e.fid_stats)
    if m & set(INCEPTION_METRICS):
        from marval_rl.eval.inception import load_inception, load_npz_stats

        if "fid" in m:
            kw["reference"] = load_npz_stats(e.reference_stats)
            files["reference_stats"] = str(Path(e.reference_stats).expanduser().resolve())
        kw["inception"], source = load_inception(e.inception_weights, device)
        files["inception_weights"] = str(Path(source).resolve())
    if rewards:
        kw["rewards"], kw["class_names"] = rewards, class_names
    return Scorers(e.metrics, prompt_template=e.prompt_template, is_splits=e.is_splits, batch_size=e.batch_size,
                   **kw), files


def evaluate_run(recipe, model, vae, scorers: Scorers, files: dict, out: Path, token_sampler) -> dict:
    """Generate the recipe's item list chunk by chunk (this rank's share; resuming what ``out`` holds),
    score each chunk, and on rank 0 summarise every chunk into the run's row (also ``out/evaluate.json``)."""
    import json

    from marval_rl import distributed
    from marval_rl.acceleration import autocast
    from marval_rl.eval.sharded import chunk_bounds, chunk_seed, item_labels, load_chunks, run_chunks
    from marval_rl.loading import generator_config
    from marval_rl.models.checkpoints import atomic_write

    s, e = recipe.sample, recipe.evaluate
    classes = [int(c) for c in e.classes] or list(range(generator_config(recipe.model)[1].class_num))
    labels = item_labels(classes, e.num_images or e.per_class * len(classes))
    bounds = chunk_bounds(len(labels), e.save_every)

    def compute(k: int) -> dict:
        lo, hi = bounds[k]
        with autocast(recipe.precision, recipe.device):  # generation only: the scores are computed in fp32
            images, seconds = generate_images(model, vae, labels[lo:hi], num_iter=s.num_iter, cfg=s.cfg,
                                              cfg_schedule=s.cfg_schedule, temperature=s.temperature,
                                              token_sampler=token_sampler,
                                              batch_size=e.batch_size, seed=chunk_seed(s.seed, k), progress=False)
        outputs = scorers.outputs(images.float(), labels[lo:hi])
        outputs["seconds"] = torch.tensor([seconds], dtype=torch.float64)
        return outputs

    run_chunks(out, len(bounds), compute)
    if not distributed.is_main():
        return {}
    outputs = load_chunks(out, len(bounds))
    if outputs["labels"].tolist() != labels:
        raise ValueError(f"{out}: the saved chunks hold other classes than this recipe's item list; evaluate into "
                         f"another output_dir or pass --overwrite")
    head = "one-step" if not hasattr(model, "diffloss") else \
        f"diffusion {s.head_steps or model.config.num_sampling_steps}"
    row = {"generator": str(recipe.model.checkpoint), "head": head, "K": s.num_iter, "cfg": s.cfg,
           "images": len(labels), **scorers.summarize(outputs),
           "s_per_image": outputs["seconds"].sum().item() / len(labels),
           "rewards": [m for m in e.metrics if m not in BUILTIN_METRICS],
           "reference_stats": files.get("reference_stats"), "inception_weights": files.get("inception_weights"),
           **{k: v for k, v in files.items() if k not in ("reference_stats", "inception_weights")},
           "device": recipe.device, "world_size": distributed.world_size(), "output": str(out / "evaluate.json")}
    atomic_write(out / "evaluate.json", lambda p: Path(p).write_text(strict_json.dumps(row, indent=1)))
    return row
