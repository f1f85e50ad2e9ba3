"""Write a small made-up image task in the folder layout `soup init` reads, to follow the
walkthrough without data of your own: three classes of shapes (squares, discs, bars) in random
colours and sizes on noise, 32 x 32 PNG files.

    python examples/your_task/make_shapes.py DIR [--train 60] [--heldout 20] [--test 20]

writes DIR/train/<class>/*.png, DIR/heldout/..., DIR/test/... and DIR/classes.txt (folder -> the
name prompts use). Leave out --heldout 0 or --test 0 to have `soup init` carve them from train.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = {"square": "square", "disc": "disc", "bar": "bar"}  # the shape decides the class, not its colour


def draw(k: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    img = Image.fromarray(rng.integers(0, 140, (size, size, 3), dtype=np.uint8))
    d = ImageDraw.Draw(img)
    a, b = int(rng.integers(1, 12)), int(rng.integers(1, 12))
    colour = tuple(int(c) for c in rng.integers(60, 256, 3))
    if k == 0:
        d.rectangle((a, b, size - int(rng.integers(1, 9)), size - int(rng.integers(1, 9))), fill=colour)
    elif k == 1:
        d.ellipse((a, b, size - int(rng.integers(1, 9)), size - int(rng.integers(1, 9))), fill=colour)
    else:
        d.rectangle((a, size // 3 + b // 2, size - b, 2 * size // 3 - a // 2), fill=colour)
    return img


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--train", type=int, default=60)
    ap.add_argument("--heldout", type=int, default=20)
    ap.add_argument("--test", type=int, default=20)
    args = ap.parse_args()
    root = Path(args.dir)
    rng = np.random.default_rng(0)
    for split in ("train", "heldout", "test"):
        for k, folder in enumerate(CLASSES):
            n = getattr(args, split)
            if n:
                (root / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(k, rng).save(root / split / folder / f"{i:04d}.png")
    (root / "classes.txt").write_text("".join(f"{f} {name}\n" for f, name in CLASSES.items()))
    print(f"wrote {root}: {len(CLASSES)} classes, {args.train}/{args.heldout}/{args.test} images each")


if __name__ == "__main__":
    main()
