"""Images for the evaluate stage: labelled sample grids, training-curve plots, atomic PNG writes.

Grid layout (``labelled_grid``), all sizes in pixels, ``pad`` between and around every box:

* column ``j`` is as wide as its widest cell (``col_w[j]``), row ``i`` as tall as its tallest (``row_h[i]``);
  each cell is centred in its box, the rest of the box stays white;
* a left label column ``ROW_LABEL_WIDTH`` wide, a header row ``HEADER_HEIGHT`` tall and, when a title is
  given, a title strip ``TITLE_HEIGHT`` tall above the header;
* width  = ``ROW_LABEL_WIDTH + sum(col_w) + pad * (n_cols + 2)``;
  height = ``HEADER_HEIGHT + sum(row_h) + pad * (n_rows + 2)`` (+ ``TITLE_HEIGHT + pad`` with a title);
* cell ``(i, j)`` box starts at x = ``2 * pad + ROW_LABEL_WIDTH + sum(col_w[:j]) + j * pad``,
  y = ``top + HEADER_HEIGHT + pad + sum(row_h[:i]) + i * pad`` with top = ``pad`` (``2 * pad + TITLE_HEIGHT``
  with a title).

Labels are black text in Pillow's scalable default font at ``FONT_SIZE`` px (legible at 100 % zoom) on white,
centred in their box, word-wrapped to the box and cut with "…" when they still do not fit. Every file is written atomically (fluxpipe.io.atomic): a temporary
file beside the target, then one rename, so a reader never sees half a PNG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from fluxpipe.io.atomic import publish, temp_beside

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FONT_SIZE = 15  # px
ROW_LABEL_WIDTH = 150
HEADER_HEIGHT = 40  # two label lines
TITLE_HEIGHT = 24
LINE_SPACING = 2
ELLIPSIS = "…"
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)
FIGSIZE = (8.0, 5.0)  # inches; at DPI the PNG is 800 x 500
DPI = 100
RAW_ALPHA = 0.25  # opacity of the raw line under a moving average

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


def label_font(size: int = FONT_SIZE) -> Font:
    """Pillow's own scalable font at ``size`` px (its small bitmap font where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or built without FreeType
        return ImageFont.load_default()


def _text_width(font: Font, text: str) -> float:
    return font.getlength(text)


def _line_height(font: Font) -> int:
    return int(font.getbbox("Ag")[3]) + LINE_SPACING


def _truncate(font: Font, text: str, width: float) -> str:
    """``text`` if it fits ``width``, else its longest prefix plus "…" that fits ("" when not even "…" fits)."""
    if _text_width(font, text) <= width:
        return text
    for end in range(len(text), -1, -1):
        candidate = text[:end].rstrip() + ELLIPSIS
        if _text_width(font, candidate) <= width:
            return candidate
    return ""


def fit_label(font: Font, text: str, width: float, max_lines: int) -> list[str]:
    """Word-wrap ``text`` into at most ``max_lines`` lines each at most ``width`` wide; cut the rest with "…"."""
    if max_lines < 1 or width <= 0:
        return []
    lines: list[str] = []
    words = text.split()
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and _text_width(font, f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words or any(_text_width(font, line) > width for line in lines):
        lines[-1] = " ".join([lines[-1], *words])  # wider than width when words were left: cut below
        lines = [_truncate(font, line, width) for line in lines]
    return [line for line in lines if line]


def _draw_label(draw: ImageDraw.ImageDraw, font: Font, text: str, box: tuple[int, int, int, int]) -> None:
    """Draw ``text`` centred in ``box`` = (x, y, width, height)."""
    x, y, width, height = box
    step = _line_height(font)
    lines = fit_label(font, text, width, height // step)
    top = y + (height - step * len(lines)) // 2
    for k, line in enumerate(lines):
        left = x + (width - _text_width(font, line)) / 2
        draw.text((left, top + k * step), line, fill=TEXT_COLOUR, font=font)


def _check_shape(cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str], pad: int) -> None:
    if not row_labels or not col_labels:
        raise ValueError("a grid needs at least one row label and one column label")
    if len(cells) != len(row_labels):
        raise ValueError(f"{len(cells)} rows of cells but {len(row_labels)} row labels")
    for i, row in enumerate(cells):
        if len(row) != len(col_labels):
            raise ValueError(f"row {i} has {len(row)} cells but there are {len(col_labels)} column labels")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")


def labelled_grid(
    cells: list[list[Image.Image]], row_labels: list[str], col_labels: list[str], title: str | None = None, pad: int = 4
) -> Image.Image:
    """An RGB grid of ``cells`` (one row per row label, one column per column label) with labels and title.

    The layout rules are in the module docstring. Transparent cells are composited on white.
    Raises ValueError when the shape of ``cells`` does not match the labels, or ``pad`` < 0.
    """
    _check_shape(cells, row_labels, col_labels, pad)
    col_w = [max(row[j].width for row in cells) for j in range(len(col_labels))]
    row_h = [max(cell.height for cell in row) for row in cells]
    width = ROW_LABEL_WIDTH + sum(col_w) + pad * (len(col_w) + 2)
    height = HEADER_HEIGHT + sum(row_h) + pad * (len(row_h) + 2) + (TITLE_HEIGHT + pad if title else 0)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    top = pad
    if title:
        _draw_label(draw, font, title, (pad, top, width - 2 * pad, TITLE_HEIGHT))
        top += TITLE_HEIGHT + pad
    xs = [2 * pad + ROW_LABEL_WIDTH + sum(col_w[:j]) + j * pad for j in range(len(col_w))]
    for j, label in enumerate(col_labels):
        _draw_label(draw, font, label, (xs[j], top, col_w[j], HEADER_HEIGHT))
    y = top + HEADER_HEIGHT + pad
    for i, row in enumerate(cells):
        _draw_label(draw, font, row_labels[i], (pad, y, ROW_LABEL_WIDTH, row_h[i]))
        for j, cell in enumerate(row):
            rgba = cell.convert("RGBA")
            canvas.paste(rgba, (xs[j] + (col_w[j] - cell.width) // 2, y + (row_h[i] - cell.height) // 2), rgba)
        y += row_h[i] + pad
    return canvas


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` points: value k averages points max(0, k - window + 1) .. k."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out: list[float] = []
    for k in range(len(values)):
        part = values[max(0, k - window + 1) : k + 1]
        out.append(sum(part) / len(part))
    return out


def curves_figure(
    series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str, smooth: int = 0
) -> Figure:
    """A matplotlib Figure (Agg canvas, no pyplot) with one line per series, points sorted by x.

    A single-point series is a marker; with ``smooth`` > 1 each series of 2+ points is a faint raw line
    under its moving average (``moving_average``). Series without points are left out.
    Raises ValueError when no series has a point or ``smooth`` < 0.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if smooth < 0:
        raise ValueError(f"smooth must be >= 0, got {smooth}")
    if not any(series.values()):
        raise ValueError("plot_curves needs at least one series with a point")
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in series.items():
        if not points:
            continue
        xs, ys = zip(*sorted(points), strict=True)
        if len(points) == 1:
            ax.plot(xs, ys, marker="o", linestyle="none", label=name)
        elif smooth > 1:
            (raw,) = ax.plot(xs, ys, alpha=RAW_ALPHA)
            ax.plot(xs, moving_average(list(ys), smooth), color=raw.get_color(), label=name)
        else:
            ax.plot(xs, ys, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def _write_atomic(out: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``out``, then rename it over ``out``; clean up on failure."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(out)
    try:
        write(tmp)
        publish(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def plot_curves(
    series: dict[str, list[tuple[float, float]]], out: Path, *, title: str, xlabel: str, ylabel: str, smooth: int = 0
) -> Path:
    """Write the ``curves_figure`` of ``series`` as a PNG (FIGSIZE at DPI) to ``out`` atomically; return ``out``."""
    fig = curves_figure(series, title=title, xlabel=xlabel, ylabel=ylabel, smooth=smooth)
    return _write_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))


def save_png(image: Image.Image, out: Path) -> Path:
    """Write ``image`` as a PNG to ``out`` atomically; return ``out``."""
    return _write_atomic(out, lambda tmp: image.save(tmp, format="PNG"))
