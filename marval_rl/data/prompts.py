"""Class names and prompt templates: how a class label becomes the text a reward model scores.

The MARVAL-RL paper prompts its CLIP / ImageReward scorers with an ImageNet class name inside a template
("A harmonious and high quality image of {}"). The ImageNet-1k names ship as ``assets/imagenet_classes.txt``
(one full WordNet lemma string per class, in class-index order; regenerate with
``scripts/make_imagenet_classes.py``).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["imagenet_class_names", "TEMPLATES", "TRAIN_TEMPLATES", "prompt", "class_prompts"]

_ASSETS = Path(__file__).resolve().parent / "assets"

# Named templates. "{}" is the class name. "paper" is the MARVAL-RL template; the rest add variety for training
# a (tiny) CLIP, so it learns the class word rather than one fixed sentence.
TEMPLATES: dict[str, str] = {
    "photo": "a photo of a {}",
    "paper": "A harmonious and high quality image of {}",
    "emoji": "an emoji of a {}",
    "icon": "an icon of a {}",
    "drawing": "a drawing of a {}",
    "cartoon": "a cartoon {}",
    "small": "a small picture of a {}",
    "closeup": "a close-up photo of the {}",
    "rendering": "a rendering of a {}",
    "bright": "a bright photo of a {}",
    "name": "{}",
}
TRAIN_TEMPLATES: list[str] = list(TEMPLATES.values())

# "a {}" as a whole word (so "a cartoon {}" and "of {}" are left alone).
_ARTICLE = re.compile(r"\b([aA]) \{\}")


@functools.lru_cache(maxsize=None)
def _imagenet_lemmas() -> tuple[str, ...]:
    lines = (_ASSETS / "imagenet_classes.txt").read_text(encoding="utf-8").splitlines()
    if len(lines) != 1000:
        raise RuntimeError(f"{_ASSETS / 'imagenet_classes.txt'} must have 1000 lines, found {len(lines)}")
    return tuple(lines)


def imagenet_class_names(all_synonyms: bool = False) -> list[str]:
    """The 1000 ImageNet-1k class names in index order: the first synonym ("tench"), or with
    ``all_synonyms=True`` the full lemma string ("tench, Tinca tinca"). Note a few first synonyms repeat
    (e.g. "crane" is both a bird and a machine)."""
    lemmas = _imagenet_lemmas()
    return list(lemmas) if all_synonyms else [s.split(",")[0].strip() for s in lemmas]


def _template(template: str) -> str:
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{}" in template:
        return template
    raise ValueError(f"unknown prompt template {template!r}: use one of {sorted(TEMPLATES)} "
                     "or a format string containing '{}'")


def prompt(name: str, template: str = "photo") -> str:
    """Fill ``template`` (a key of :data:`TEMPLATES` or a string with ``{}``) with ``name``; "a {}" becomes
    "an {}" before a vowel ("a photo of an ambulance")."""
    text = _template(template)
    if name and name[0].lower() in "aeiou":
        text = _ARTICLE.sub(lambda m: m.group(1) + "n {}", text)
    return text.format(name)


def class_prompts(class_ids: Iterable[int] | torch.Tensor, names: Sequence[str], template: str = "photo") -> list[str]:
    """One prompt per class id, e.g. ``class_prompts(labels, emoji.class_names(), "paper")``."""
    ids = class_ids.tolist() if isinstance(class_ids, torch.Tensor) else list(class_ids)
    return [prompt(names[int(i)], template) for i in ids]


def class_ids_from(values: Sequence, names: Sequence[str], key: str) -> list[int]:
    """A recipe's class list as ids: ints stay, class names (``"lion"``, case and spaces ignored) become
    their index in ``names``; an unknown name is a ValueError naming ``key`` and the closest names."""
    import difflib

    norm = lambda n: " ".join(str(n).lower().replace("_", " ").split())  # noqa: E731
    index: dict[str, int] = {}
    for i, n in enumerate(names):
        index.setdefault(norm(n), i)
    out, unknown = [], []
    for v in values:
        if isinstance(v, str):
            if norm(v) in index:
                out.append(index[norm(v)])
            else:
                unknown.append(v)
        else:
            out.append(int(v))
    if unknown:
        close = difflib.get_close_matches(norm(unknown[0]), list(index), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"{key}: unknown class name(s) {unknown}{hint}; give class ids or names of the "
                         f"{len(names)} classes")
    return out
