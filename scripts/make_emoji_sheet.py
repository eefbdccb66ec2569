#!/usr/bin/env python
"""Regenerate the emoji-56 sprite sheet and class table (maintainer script; the outputs are committed).

Writes ``marval_rl/data/assets/emoji56.png`` (one RGBA sheet, 8 columns of 64x64 sprites, row-major in class
order) and ``emoji56.csv`` (index,name,codepoint,imagenet_index). Tests and users never run this: they read the
committed files, so nothing at run time needs apt or the font.

Needs Debian's ``fonts-noto-color-emoji``. Noto Color Emoji is a CBDT bitmap font: FreeType only opens it at
its bitmap strike (size 109) and Pillow draws the colour bitmap only with ``embedded_color=True``.

    apt-get install -y fonts-noto-color-emoji
    python scripts/make_emoji_sheet.py [--font PATH] [--imagenet-classes marval_rl/data/assets/imagenet_classes.txt]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ASSETS = Path(__file__).resolve().parents[1] / "marval_rl" / "data" / "assets"
FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
STRIKE = 109          # the only pixel size the CBDT font opens at
SPRITE = 64           # side of one sprite in the sheet
COLUMNS = 8

# (name, codepoint, ImageNet-1k index): the emoji-56 classes of /work/shared/OFFLINE_ASSETS.md, in class order.
# Each name is (a synonym of) the ImageNet lemma at that index; "panda" is deliberately 388 (giant panda), not
# the automatic match 387 (lesser panda).
CLASSES: list[tuple[str, int, int]] = [
    ("lion", 0x1F981, 291), ("tiger", 0x1F405, 292), ("zebra", 0x1F993, 340), ("koala", 0x1F428, 105),
    ("hippopotamus", 0x1F99B, 344), ("gorilla", 0x1F98D, 366), ("flamingo", 0x1F9A9, 130),
    ("peacock", 0x1F99A, 84), ("snail", 0x1F40C, 113), ("lady beetle", 0x1F41E, 301),
    ("scorpion", 0x1F982, 71), ("otter", 0x1F9A6, 360), ("skunk", 0x1F9A8, 361), ("llama", 0x1F999, 355),
    ("hamster", 0x1F439, 333), ("panda", 0x1F43C, 388),
    ("banana", 0x1F34C, 954), ("strawberry", 0x1F353, 949), ("pineapple", 0x1F34D, 953),
    ("lemon", 0x1F34B, 951), ("broccoli", 0x1F966, 937), ("mushroom", 0x1F344, 947), ("pizza", 0x1F355, 963),
    ("hot dog", 0x1F32D, 934), ("bagel", 0x1F96F, 931), ("pretzel", 0x1F968, 932),
    ("ice cream", 0x1F368, 928), ("cucumber", 0x1F952, 943),
    ("ambulance", 0x1F691, 407), ("fire engine", 0x1F692, 555), ("taxi", 0x1F695, 468),
    ("tractor", 0x1F69C, 866), ("racing car", 0x1F3CE, 751), ("speedboat", 0x1F6A4, 814),
    ("parachute", 0x1FA82, 701), ("castle", 0x1F3F0, 483), ("violin", 0x1F3BB, 889), ("banjo", 0x1FA95, 420),
    ("saxophone", 0x1F3B7, 776), ("drum", 0x1F941, 541), ("soccer ball", 0x26BD, 805),
    ("basketball", 0x1F3C0, 430), ("volleyball", 0x1F3D0, 890), ("backpack", 0x1F392, 414),
    ("laptop", 0x1F4BB, 620), ("television", 0x1F4FA, 851), ("umbrella", 0x2602, 879),
    ("teddy bear", 0x1F9F8, 850), ("teapot", 0x1FAD6, 849), ("candle", 0x1F56F, 470), ("hammer", 0x1F528, 587),
    ("running shoe", 0x1F45F, 770), ("volcano", 0x1F30B, 980), ("hourglass", 0x231B, 604),
    ("radio", 0x1F4FB, 754), ("shopping cart", 0x1F6D2, 791),
]


def render_glyph(font: ImageFont.FreeTypeFont, codepoint: int, name: str) -> Image.Image:
    """One emoji -> tight, square-padded, transparent RGBA sprite of side SPRITE."""
    char = chr(codepoint)
    # A font without the glyph silently draws .notdef (an empty or boxed outline); catch it via the cmap.
    if font.getmask(char).getbbox() is None:
        raise SystemExit(f"{name} (U+{codepoint:04X}): the font has no glyph for this codepoint")
    canvas = Image.new("RGBA", (2 * STRIKE, 2 * STRIKE), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((STRIKE // 2, STRIKE // 2), char, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        raise SystemExit(f"{name} (U+{codepoint:04X}): rendered glyph has an empty alpha channel")
    glyph = canvas.crop(bbox)
    rgb_extent = glyph.convert("RGB").getextrema()
    if all(lo == hi for lo, hi in rgb_extent):
        raise SystemExit(f"{name} (U+{codepoint:04X}): glyph is a single flat colour, not a colour emoji")
    # Pad to a square (centred) so resizing keeps the aspect ratio; transparent padding.
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    # Pillow resizes RGBA in premultiplied space, so transparent pixels do not bleed dark fringes.
    return square.resize((SPRITE, SPRITE), Image.Resampling.LANCZOS)


def check_imagenet(names_file: Path) -> None:
    """Print each class beside the ImageNet lemma its index points at, and fail on obvious mismatches."""
    lemmas = names_file.read_text(encoding="utf-8").splitlines()
    bad = []
    for name, _, idx in CLASSES:
        lemma = lemmas[idx]
        words = {w.strip().lower() for w in lemma.split(",")}
        # Every class name (or its single-word head, e.g. "lady beetle" / "racing car") must occur in the lemma.
        ok = name in words or any(name in w or w in name for w in words)
        print(f"{'ok ' if ok else 'BAD'} {name:14s} -> {idx:4d} {lemma}")
        if not ok:
            bad.append(name)
    if bad:
        raise SystemExit(f"ImageNet index does not match the name for: {bad}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--font", default=FONT)
    parser.add_argument("--out-dir", type=Path, default=ASSETS)
    parser.add_argument("--imagenet-classes", type=Path, default=ASSETS / "imagenet_classes.txt",
                        help="cross-check the ImageNet indices against this name list (skipped if absent)")
    args = parser.parse_args(argv)

    if len(CLASSES) != 56 or len({c[0] for c in CLASSES}) != 56 or len({c[2] for c in CLASSES}) != 56:
        raise SystemExit("class table must have 56 distinct names and 56 distinct ImageNet indices")
    if args.imagenet_classes.is_file():
        check_imagenet(args.imagenet_classes)

    font = ImageFont.truetype(args.font, STRIKE)
    rows = (len(CLASSES) + COLUMNS - 1) // COLUMNS
    sheet = Image.new("RGBA", (COLUMNS * SPRITE, rows * SPRITE), (0, 0, 0, 0))
    for i, (name, cp, _) in enumerate(CLASSES):
        sprite = render_glyph(font, cp, name)
        sheet.paste(sprite, ((i % COLUMNS) * SPRITE, (i // COLUMNS) * SPRITE))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / "emoji56.png"
    sheet.save(png, optimize=True)
    with open(args.out_dir / "emoji56.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["index", "name", "codepoint", "imagenet_index"])
        for i, (name, cp, idx) in enumerate(CLASSES):
            writer.writerow([i, name, f"U+{cp:04X}", idx])
    print(f"wrote {png} ({png.stat().st_size / 1024:.0f} KB, {sheet.size[0]}x{sheet.size[1]}) and emoji56.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
