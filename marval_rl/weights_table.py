"""The table of released weights the recipes use: name -> Hugging Face repo, files, pinned revision,
licence, what it is, which loader / recipe key takes it (``docs/weights.md`` is the same table).
hub.py downloads and resolves its entries (and re-exports :data:`WEIGHTS`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Weights:
    name: str
    repo_id: str
    what: str
    licence: str
    used_by: str
    files: tuple[str, ...] = ()            # fetched one by one; empty = a folder (snapshot with `patterns`)
    patterns: tuple[str, ...] = ()         # snapshot allow-patterns (folder entries)
    weights_any: tuple[str, ...] = ()      # folder entries: the first of these the repo has is fetched too
    revision: str | None = None            # a pinned commit; None = main
    local_dir: str = ""                    # subfolder under `download --dir DIR` (the recipes' layout)
    rename: tuple[tuple[str, str], ...] = ()   # repo file -> its name under --dir (the recipes' name)
    sha256: tuple[tuple[str, str], ...] = ()   # checked after download
    note: str = ""
    source: str = ""                       # where repo / file names were found
    files_text: str = ""                   # how the table shows a folder entry's files

    @property
    def is_folder(self) -> bool:
        return not self.files

    def local_name(self, filename: str) -> str:
        return dict(self.rename).get(filename, filename)


# The official MAR release (LTH14/mar) is on Dropbox; its README links the Hugging Face mirror
# jadechoghari/mar. That repo's main branch holds single-state-dict safetensors conversions; its history
# (commit 773c9bd...) still holds the official MAR-B checkpoint-last.pth (model + model_ema) and kl16.ckpt.
_MAR_REV = "773c9bdcd98740c7b876ce0d66f684a0e2468990"
_NON_EMA = ("one state dict converted by the mirror (for MAR-B it was reported to be checkpoint['model'], "
            "not the 'model_ema' the paper's numbers use); the official EMA file is on Dropbox only (LTH14/mar README)")

WEIGHTS: dict[str, Weights] = {w.name: w for w in [
    Weights("mar_base", "jadechoghari/mar", files=("checkpoint-last.pth",), revision=_MAR_REV,
            local_dir="mar/mar_base",
            sha256=(("checkpoint-last.pth", "7e970a33bc90353e2fabe3498ed1f2d194dd8d17cd387665f80b2984dfca538c"),),
            what="MAR-B (208M), official checkpoint-last.pth with 'model' and 'model_ema', 1.66 GB",
            licence="MIT (LTH14/mar)", used_by="model.checkpoint + model.arch=mar_base (load_official_mar); "
            "recipes/distill_b.yaml", source="LTH14/mar README (HF link); revision and sha256 from a third-party "
            "download script, unverified here"),
    Weights("mar_large", "jadechoghari/mar", files=("mar-large.safetensors",), local_dir="mar/mar_large",
            what="MAR-L (479M), safetensors state dict, 1.9 GB", licence="MIT (LTH14/mar)",
            used_by="model.checkpoint + model.arch=mar_large; recipes/distill_l.yaml", note=_NON_EMA,
            source="file names from third-party READMEs linking huggingface.co/jadechoghari/mar"),
    Weights("mar_huge", "jadechoghari/mar", files=("mar-huge.safetensors",), local_dir="mar/mar_huge",
            what="MAR-H (943M), safetensors state dict, 3.8 GB", licence="MIT (LTH14/mar)",
            used_by="model.checkpoint + model.arch=mar_huge; recipes/distill_h.yaml", note=_NON_EMA,
            source="as mar_large"),
    Weights("kl16", "jadechoghari/mar", files=("kl16.ckpt",), revision=_MAR_REV, local_dir="vae",
            sha256=(("kl16.ckpt", "34ce001bcfffb7af67ec8af1e683a30d7bd45760855ddc7deedc1330f2cfd38f"),),
            what="KL-16 VAE of MAR, official kl16.ckpt, 266 MB", licence="MIT (LTH14/mar)",
            used_by="vae.checkpoint (load_official_vae); every *_b/_l/_h recipe", source="as mar_base"),
    Weights("pickscore", "yuvalkirstain/PickScore_v1", patterns=("*.json", "*.txt"),
            weights_any=("model.safetensors", "pytorch_model.bin"), local_dir="PickScore_v1",
            files_text="config, processor and tokenizer files + model.safetensors (else pytorch_model.bin)",
            what="PickScore v1: CLIP-H/14 fine-tuned on Pick-a-Pic (transformers CLIPModel folder), ~3.9 GB",
            licence="not stated in the sources read here; check the model card",
            used_by="train.rewards pickscore path=; recipes/pickscore_b.yaml",
            source="yuvalkirstain/PickScore README"),
    Weights("pickscore_processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            patterns=("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "vocab.json", "merges.txt"),
            local_dir="CLIP-ViT-H-14-laion2B-s32B-b79K", files_text="processor and tokenizer files only (no weights)",
            what="the CLIP-H/14 processor PickScore's reference code uses (preprocessing + tokenizer files only)",
            licence="MIT", used_by="train.rewards pickscore processor=; recipes/pickscore_b.yaml",
            source="yuvalkirstain/PickScore README"),
    Weights("image_reward", "THUDM/ImageReward", files=("ImageReward.pt", "med_config.json"),
            local_dir="ImageReward", what="ImageReward v1.0 (BLIP ViT-L + BERT + MLP), ImageReward.pt 1.8 GB",
            licence="Apache-2.0 (THUDM/ImageReward)", used_by="image_reward checkpoint=, med_config=; "
            "recipes/imagereward_b.yaml (gold in pickscore_b, clip_b)", source="THUDM/ImageReward ImageReward/utils.py"),
    Weights("bert_base_uncased", "google-bert/bert-base-uncased", files=("vocab.txt",),
            local_dir="bert-base-uncased", what="BERT uncased WordPiece vocabulary (30,522 lines) for ImageReward",
            licence="Apache-2.0", used_by="image_reward vocab=", source="THUDM/ImageReward (BLIP tokenizer)"),
    Weights("clip_vit_b32", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", files=("open_clip_model.safetensors",),
            local_dir="open_clip", rename=(("open_clip_model.safetensors", "ViT-B-32.safetensors"),),
            what="open_clip ViT-B-32, LAION-2B (GELU: matches model=ViT-B-32; OpenAI's weights need "
            "ViT-B-32-quickgelu), 605 MB", licence="MIT", used_by="clip_score model=ViT-B-32 weights=; "
            "recipes/clip_b.yaml (gold in pickscore_b, imagereward_b)",
            source="open_clip pretrained.py (ViT-B-32 laion2b_s34b_b79k, open_clip_model.safetensors)"),
]}


TABLE_COLUMNS = ("name", "repo", "files", "licence", "used by")


def table_rows() -> list[dict[str, str]]:
    rows = []
    for w in WEIGHTS.values():
        files = ", ".join(w.files) if w.files else (w.files_text or ", ".join(w.patterns))
        repo = w.repo_id + (f"@{w.revision[:7]}" if w.revision else "")
        rows.append({"name": w.name, "repo": repo, "files": files, "licence": w.licence, "used by": w.used_by})
    return rows


def format_table(columns: Sequence[str] = ("name", "repo", "files", "licence")) -> str:
    """The table as plain text (``marval-rl download --list``)."""
    rows = table_rows()
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns).rstrip() for r in rows]
    return "\n".join(lines)
