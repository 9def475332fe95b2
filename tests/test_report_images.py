"""Tests for fluxpipe.inference.report_images: grid layout, label fitting, curve plots, atomic PNG writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageFont

from fluxpipe.inference import report_images as ri
from fluxpipe.inference.report_images import (
    HEADER_HEIGHT,
    ROW_LABEL_WIDTH,
    TITLE_HEIGHT,
    curves_figure,
    fit_label,
    labelled_grid,
    moving_average,
    plot_curves,
    save_png,
)

COLOURS = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
# (width, height) of each cell: column widths are 30, 50, 20; row heights are 40, 24.
SIZES = [[(30, 40), (20, 10), (20, 20)], [(10, 24), (50, 24), (6, 8)]]


def solid_cells() -> list[list[Image.Image]]:
    return [[Image.new("RGB", SIZES[i][j], COLOURS[i][j]) for j in range(3)] for i in range(2)]


def is_white(pixel: tuple[int, int, int]) -> bool:
    return pixel == (255, 255, 255)


def test_grid_size_is_the_sum_of_columns_rows_margins_and_padding() -> None:
    grid = labelled_grid(solid_cells(), ["epoch 1", "epoch 2"], ["a", "b", "c"], pad=4)
    assert grid.mode == "RGB"
    assert grid.size == (ROW_LABEL_WIDTH + 30 + 50 + 20 + 4 * 5, HEADER_HEIGHT + 40 + 24 + 4 * 4)
    titled = labelled_grid(solid_cells(), ["epoch 1", "epoch 2"], ["a", "b", "c"], title="LoRA", pad=7)
    assert titled.size == (ROW_LABEL_WIDTH + 100 + 7 * 5, TITLE_HEIGHT + 7 + HEADER_HEIGHT + 64 + 7 * 4)


@pytest.mark.parametrize("title", [None, "run 1"])
def test_each_cell_is_centred_in_its_box(title: str | None) -> None:
    pad = 5
    grid = labelled_grid(solid_cells(), ["r0", "r1"], ["c0", "c1", "c2"], title=title, pad=pad)
    top = pad + (TITLE_HEIGHT + pad if title else 0)
    col_x = [2 * pad + ROW_LABEL_WIDTH, 3 * pad + ROW_LABEL_WIDTH + 30, 4 * pad + ROW_LABEL_WIDTH + 80]
    row_y = [top + HEADER_HEIGHT + pad, top + HEADER_HEIGHT + 2 * pad + 40]
    col_w, row_h = [30, 50, 20], [40, 24]
    for i in range(2):
        for j in range(3):
            w, h = SIZES[i][j]
            x0 = col_x[j] + (col_w[j] - w) // 2
            y0 = row_y[i] + (row_h[i] - h) // 2
            for x, y in [(x0, y0), (x0 + w - 1, y0 + h - 1), (x0 + w // 2, y0 + h // 2)]:
                assert grid.getpixel((x, y)) == COLOURS[i][j], (i, j, x, y)
            assert is_white(grid.getpixel((x0 - 1, y0))), (i, j)
            assert is_white(grid.getpixel((x0 + w, y0 + h - 1))), (i, j)
            assert is_white(grid.getpixel((x0, y0 - 1))), (i, j)


def test_transparent_cells_are_composited_on_white() -> None:
    cell = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    cell.putpixel((5, 5), (0, 0, 255, 255))
    grid = labelled_grid([[cell]], [""], [""], pad=0)
    assert grid.getpixel((ROW_LABEL_WIDTH, HEADER_HEIGHT)) == (255, 255, 255)
    assert grid.getpixel((ROW_LABEL_WIDTH + 5, HEADER_HEIGHT + 5)) == (0, 0, 255)


def dark_pixels(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    return sum(image.crop(box).convert("L").histogram()[:128])


def test_labels_and_title_are_drawn_in_their_boxes() -> None:
    cells = [[Image.new("RGB", (80, 40), (200, 200, 200))]]
    pad = 4
    blank = labelled_grid(cells, [""], [""], pad=pad)
    grid = labelled_grid(cells, ["epoch 12"], ["step 300"], title="my LoRA", pad=pad)
    title_box = (0, 0, grid.width, pad + TITLE_HEIGHT)
    header_box = (0, 2 * pad + TITLE_HEIGHT, grid.width, 2 * pad + TITLE_HEIGHT + HEADER_HEIGHT)
    label_box = (0, header_box[3] + pad, pad + ROW_LABEL_WIDTH, grid.height)
    assert dark_pixels(grid, title_box) > 10
    assert dark_pixels(grid, header_box) > 10
    assert dark_pixels(grid, label_box) > 10
    assert dark_pixels(blank, (0, 0, blank.width, blank.height)) == 0


def test_labels_are_legible_at_100_percent() -> None:
    """Column labels are drawn in a 15 px font: a capital letter is at least 10 px tall (Pillow's bare default
    font draws it 7 px tall, too small to read beside 64 px samples)."""
    grid = labelled_grid([[Image.new("RGB", (120, 64), (255, 255, 255))]], [""], ["EPOCH"], pad=0)
    ys = [y for y in range(HEADER_HEIGHT) for x in range(grid.width) if grid.getpixel((x, y))[0] < 128]
    assert ys and max(ys) - min(ys) + 1 >= 10


def test_fit_label_wraps_and_cuts_with_an_ellipsis() -> None:
    font = ImageFont.load_default()
    assert fit_label(font, "epoch 1", 200, 2) == ["epoch 1"]
    wrapped = fit_label(font, "learning rate one", font.getlength("learning rate") + 1, 2)
    assert wrapped == ["learning rate", "one"]
    long = "a very long label that certainly needs more than two lines of sixty pixels"
    lines = fit_label(font, long, 60, 2)
    assert len(lines) == 2 and lines[-1].endswith("…")
    assert all(font.getlength(line) <= 60 for line in lines)
    word = fit_label(font, "supercalifragilisticexpialidocious", 50, 3)
    assert len(word) == 1 and word[0].endswith("…") and font.getlength(word[0]) <= 50
    assert fit_label(font, "anything", 100, 0) == []


def test_long_labels_stay_inside_their_column() -> None:
    cells = [[Image.new("RGB", (30, 30), (255, 255, 255)), Image.new("RGB", (30, 30), (255, 255, 255))]]
    pad = 10
    grid = labelled_grid(cells, ["x"], ["an extremely long column label indeed", "b"], pad=pad)
    gap_x = 2 * pad + ROW_LABEL_WIDTH + 30  # the pad between column 0 and column 1
    assert dark_pixels(grid, (gap_x, pad, gap_x + pad, pad + HEADER_HEIGHT)) == 0
    assert dark_pixels(grid, (2 * pad + ROW_LABEL_WIDTH, pad, gap_x, pad + HEADER_HEIGHT)) > 0


@pytest.mark.parametrize(
    ("rows", "cols", "n_rows", "n_cols"),
    [
        (["a"], ["x", "y", "z"], 2, 3),  # too few row labels
        (["a", "b", "c"], ["x", "y", "z"], 2, 3),  # too many row labels
        (["a", "b"], ["x", "y"], 2, 3),  # too few column labels
        ([], [], 0, 0),  # empty grid
    ],
)
def test_mismatched_labels_raise(rows: list[str], cols: list[str], n_rows: int, n_cols: int) -> None:
    cells = [[Image.new("RGB", (4, 4)) for _ in range(n_cols)] for _ in range(n_rows)]
    with pytest.raises(ValueError):
        labelled_grid(cells, rows, cols)


def test_ragged_rows_raise() -> None:
    cells = [[Image.new("RGB", (4, 4))] * 2, [Image.new("RGB", (4, 4))]]
    with pytest.raises(ValueError, match="row 1"):
        labelled_grid(cells, ["a", "b"], ["x", "y"])


def test_moving_average_is_trailing() -> None:
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0, 6.0], 3) == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError):
        moving_average([1.0], 0)


def assert_png(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()
        assert img.format == "PNG"
    with Image.open(path) as img:
        assert img.size == (round(ri.FIGSIZE[0] * ri.DPI), round(ri.FIGSIZE[1] * ri.DPI))
        assert sum(1 for n in img.convert("L").histogram() if n) > 2  # something was drawn


def test_plot_curves_writes_a_png_with_smoothing_and_a_single_point(tmp_path: Path) -> None:
    series = {"loss": [(float(i), 1.0 / (i + 1) + (i % 3) * 0.05) for i in range(30)], "val": [(29.0, 0.2)]}
    out = tmp_path / "plots" / "loss.png"
    assert plot_curves(series, out, title="loss", xlabel="step", ylabel="loss", smooth=5) == out
    assert_png(out)
    plain = plot_curves(series, tmp_path / "plain.png", title="loss", xlabel="step", ylabel="loss")
    assert_png(plain)
    assert out.read_bytes() != plain.read_bytes()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["loss.png", "plain.png", "plots"]


def test_curves_figure_lines() -> None:
    series = {"loss": [(2.0, 3.0), (0.0, 1.0), (1.0, 2.0)], "val": [(5.0, 0.5)], "none": []}
    ax = curves_figure(series, title="t", xlabel="x", ylabel="y", smooth=2).axes[0]
    raw, smoothed, single = ax.get_lines()
    assert list(raw.get_xdata()) == [0.0, 1.0, 2.0] and raw.get_alpha() == ri.RAW_ALPHA
    assert list(smoothed.get_ydata()) == [1.0, 1.5, 2.5] and smoothed.get_color() == raw.get_color()
    assert single.get_marker() == "o" and single.get_linestyle() == "None"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss", "val"]
    assert ax.get_title() == "t" and ax.get_xlabel() == "x" and ax.get_ylabel() == "y"
    unsmoothed = curves_figure(series, title="t", xlabel="x", ylabel="y").axes[0]
    assert len(unsmoothed.get_lines()) == 2 and unsmoothed.get_lines()[0].get_alpha() is None


@pytest.mark.parametrize("series", [{}, {"loss": []}])
def test_plot_curves_without_points_raises(tmp_path: Path, series: dict) -> None:
    with pytest.raises(ValueError):
        plot_curves(series, tmp_path / "x.png", title="t", xlabel="x", ylabel="y")
    assert list(tmp_path.iterdir()) == []


def test_save_png_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    image = Image.new("RGB", (12, 7), (10, 20, 30))
    out = save_png(image, tmp_path / "sub" / "grid.png")
    assert out == tmp_path / "sub" / "grid.png"
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (12, 7) and img.convert("RGB").getpixel((3, 3)) == (10, 20, 30)


def test_failed_save_png_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = save_png(Image.new("RGB", (5, 5), (1, 2, 3)), tmp_path / "grid.png")
    before = out.read_bytes()
    image = Image.new("RGB", (9, 9), (200, 0, 0))

    def broken_save(fp: str, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(image, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_failed_plot_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    out = tmp_path / "curves.png"
    out.write_bytes(b"old")

    def broken_savefig(self: Figure, fname: str, **kwargs: object) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plot_curves({"a": [(0.0, 1.0), (1.0, 2.0)]}, out, title="t", xlabel="x", ylabel="y")
    assert out.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_matplotlib_is_imported_lazily_and_pyplot_never() -> None:
    code = (
        "import sys; import fluxpipe.inference.report_images as ri; assert 'matplotlib' not in sys.modules; "
        "ri.curves_figure({'a': [(0.0, 1.0)]}, title='t', xlabel='x', ylabel='y'); "
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
