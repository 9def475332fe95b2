"""The pipeline demo's dataset: striped flags, a concept the trained demo models never saw (issue 17, item 2).

    python tools/make_demo_concept.py [OUT]        # default: config/demo/flags

The demo DiT (fluxpipe/demo_weights) knows only one solid shape in one colour on a solid background
("a red circle on a blue background", tools/train_demo_models.py). This writes a few 64 px images of
horizontally striped flags (four bands of equal height, two colours alternating, the first-named colour on top)
with captions "a red and white striped flag", their edge maps for ControlNet (``conditioning/``, same stems) and
nothing else: deterministic (no randomness), so rerunning it reproduces the committed files bit for bit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageOps

COLORS = {  # as tools/train_demo_models.py
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
PAIRS = (
    ("red", "white"),
    ("blue", "yellow"),
    ("green", "black"),
    ("black", "yellow"),
    ("white", "blue"),
    ("yellow", "red"),
)
SIZE = 64
BANDS = 4


def flag(first: str, second: str, size: int = SIZE, bands: int = BANDS) -> Image.Image:
    """``bands`` horizontal stripes of equal height, ``first`` on top, alternating with ``second``."""
    image = Image.new("RGB", (size, size), COLORS[second])
    pen = ImageDraw.Draw(image)
    height = size // bands
    for band in range(0, bands, 2):
        pen.rectangle((0, band * height, size - 1, (band + 1) * height - 1), fill=COLORS[first])
    return image


def caption(first: str, second: str) -> str:
    return f"a {first} and {second} striped flag"


def edges(image: Image.Image) -> Image.Image:
    """The ControlNet hint, made as the photos' edge maps (config/demo/PROVENANCE.md)."""
    return ImageOps.autocontrast(image.convert("L").filter(ImageFilter.FIND_EDGES)).convert("RGB")


def write(out: Path) -> list[Path]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "conditioning").mkdir(parents=True, exist_ok=True)
    written = []
    for first, second in PAIRS:
        stem = f"{first}_{second}_flag"
        image = flag(first, second)
        image.save(out / "images" / f"{stem}.png", optimize=True)
        (out / "images" / f"{stem}.txt").write_text(caption(first, second) + "\n")
        edges(image).save(out / "conditioning" / f"{stem}.png", optimize=True)
        written.append(out / "images" / f"{stem}.png")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=Path("config/demo/flags"))
    for path in write(p.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
