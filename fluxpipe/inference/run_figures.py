"""Figures of the run report: the training curves (loss, learning rate, seconds per step and peak memory per
epoch) and the dataset preview (thumbnails with their captions, split, repeats and bucket). Each is returned as
PNG bytes (the report's HTML embeds them) and written atomically with ``write_png``."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from fluxpipe.inference.report_images import fit_label, moving_average
from fluxpipe.inference.report_images import label_font as font
from fluxpipe.io.atomic import publish, temp_beside
from fluxpipe.io.run_files import EpochTiming

THUMB = 128  # px: longest side of a preview thumbnail
TILE_W, CAPTION_LINES, PREVIEW_COLUMNS = 184, 3, 6
HELD_OUT = (200, 40, 40)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_png(data: bytes, out: Path) -> Path:
    """Write PNG bytes to ``out`` atomically (a temporary file beside it, then one rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out)
    try:
        Path(tmp).write_bytes(data)
        publish(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def curves_png(title: str, records: list[dict], epochs: list[EpochTiming]) -> bytes:
    """Four panels: training loss (raw and smoothed) and learning rate per step; seconds per step and peak
    memory per epoch. Empty panels say so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11.0, 7.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    (loss, lr), (speed, memory) = fig.subplots(2, 2)
    steps = [int(r["step"]) for r in records]
    if records:
        values = [float(r["loss"]) for r in records]
        loss.plot(steps, values, alpha=0.25, color="C0")
        loss.plot(steps, moving_average(values, max(2, len(values) // 20)), color="C0", label="moving average")
        loss.legend()
        lr.plot(steps, [float(r.get("lr") or 0.0) for r in records], color="C1")
        lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    xs = [e.epoch for e in epochs]
    if epochs:
        speed.bar(xs, [e.s_per_step for e in epochs], color="C2")
        peaks = [(e.epoch, e.peak_memory_mb) for e in epochs if e.peak_memory_mb is not None]
        if peaks:
            memory.plot(*zip(*peaks, strict=True), marker="o", color="C3")
    for ax, name, xlabel, ylabel in (
        (loss, "training loss", "step", "loss"),
        (lr, "learning rate", "step", "lr"),
        (speed, "seconds per step", "epoch", "s/step"),
        (memory, "peak memory", "epoch", "MiB"),
    ):
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.has_data():
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@dataclass(frozen=True, slots=True)
class PreviewItem:
    path: Path
    caption: str
    split: str  # "train" or "val" (held out)
    repeats: int
    bucket: tuple[int, int]


def _thumbnail(path: Path) -> Image.Image:
    try:
        with Image.open(path) as opened:
            im = opened.convert("RGB")
            scale = THUMB / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            return im.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    except OSError:  # a missing or unreadable image still gets its tile
        return Image.new("RGB", (THUMB, THUMB), (230, 230, 230))


def preview_png(items: list[PreviewItem], title: str) -> bytes:
    """Tiles of thumbnail, caption (wrapped to three lines) and "train · N repeats · WxH" (held-out images in
    red, "held out")."""
    f = font()
    line = int(f.getbbox("Ag")[3]) + 3
    tile_h = THUMB + 8 + line * (CAPTION_LINES + 1) + 8
    cols = max(1, min(PREVIEW_COLUMNS, len(items)))
    rows = max(1, -(-len(items) // cols))
    top = line + 12
    canvas = Image.new("RGB", (cols * TILE_W + 8, top + rows * tile_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(0, 0, 0), font=f)
    for k, item in enumerate(items):
        x, y = 8 + (k % cols) * TILE_W, top + (k // cols) * tile_h
        thumb = _thumbnail(item.path)
        canvas.paste(thumb, (x + (TILE_W - 8 - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        held = item.split != "train"
        if held:
            draw.rectangle((x - 2, y - 2, x + TILE_W - 6, y + THUMB + 1), outline=HELD_OUT, width=3)
        ty = y + THUMB + 6
        for text in fit_label(f, item.caption or "(no caption)", TILE_W - 16, CAPTION_LINES):
            draw.text((x, ty), text, fill=(0, 0, 0), font=f)
            ty += line
        w, h = item.bucket
        facts = f"held out · {w}x{h}" if held else f"train · {item.repeats} repeats · {w}x{h}"
        facts = " ".join(fit_label(f, facts, TILE_W - 16, 1))
        draw.text((x, y + THUMB + 6 + line * CAPTION_LINES), facts, fill=HELD_OUT if held else (90, 90, 90), font=f)
    return png_bytes(canvas)
