#!/usr/bin/env python
"""Regenerate ``marval_rl/data/assets/imagenet_classes.txt`` (maintainer script; its output is committed).

The 1000 ImageNet-1k class names come from two plain-text files that ship inside the timm wheel:
``imagenet_synsets.txt`` (the 1000 WordNet ids in class-index order) and ``imagenet_synset_to_lemma.txt``
(WordNet id -> comma-separated lemmas). We read them straight out of the wheel with ``zipfile`` rather than
importing timm, which would drag in torchvision/huggingface and is not a project dependency.

    pip download --no-deps timm==1.0.31 -d /tmp/timmwheel
    python scripts/make_imagenet_classes.py /tmp/timmwheel/timm-1.0.31-py3-none-any.whl
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "marval_rl" / "data" / "assets" / "imagenet_classes.txt"
SYNSETS = "timm/data/_info/imagenet_synsets.txt"
LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"


def imagenet_lemmas(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        synsets = zf.read(SYNSETS).decode("utf-8").split()
        lemma_of = {}
        for line in zf.read(LEMMAS).decode("utf-8").splitlines():
            if line.strip():
                wnid, lemma = line.split("\t", 1)
                lemma_of[wnid] = lemma.strip()
    if len(synsets) != 1000 or len(set(synsets)) != 1000:
        raise SystemExit(f"expected 1000 distinct synsets in {SYNSETS}, got {len(synsets)}")
    missing = [s for s in synsets if s not in lemma_of]
    if missing:
        raise SystemExit(f"{len(missing)} synsets have no lemma, e.g. {missing[:3]}")
    return [lemma_of[s] for s in synsets]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="path to a timm 1.x wheel (.whl)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    names = imagenet_lemmas(args.wheel)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(names) + "\n", encoding="utf-8")
    # Spot checks a human can eyeball; the emoji table leans on these indices.
    for idx in (0, 291, 388, 407, 954):
        print(f"{idx:4d}  {names[idx]}")
    print(f"wrote {len(names)} names to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
