"""Image and caption reading on tiny files written with Pillow; expected pixels worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxpipe.data.images import (
    BadImage,
    is_image_file,
    load_rgb,
    probe_image,
    read_caption,
    resize_and_crop,
    to_rgb8,
    to_tensor,
)
from fluxpipe.errors import FluxpipeError


def pixels(img: Image.Image) -> list[tuple[int, ...]]:
    return [img.getpixel((x, y)) for y in range(img.size[1]) for x in range(img.size[0])]


def near(actual: tuple[int, ...], expected: tuple[int, ...], tol: int = 6) -> bool:
    """JPEG is lossy: a pixel counts as the expected colour within a few levels."""
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def test_is_image_file():
    assert is_image_file(Path("a/B.JPG"))
    assert is_image_file(Path("x.WebP"))
    assert not is_image_file(Path("x.txt"))
    assert not is_image_file(Path("png"))


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "c.jpg"
    img = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # no ink = white
    img.paste((0, 255, 255, 0), (0, 0, 8, 8))  # magenta + yellow = red on the left half
    img.save(path, quality=95)
    assert probe_image(path) == (16, 8, "CMYK")
    rgb = load_rgb(path)
    assert rgb.mode == "RGB"
    assert near(rgb.getpixel((2, 4)), (255, 0, 0))
    assert near(rgb.getpixel((13, 4)), (255, 255, 255))


def test_16bit_png_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(np.array([[65535, 257 * 100, 0, 32896]], dtype=np.uint16)).save(path)
    assert probe_image(path) == (4, 1, "I;16")
    # /257: 65535 -> 255, 25700 -> 100, 0 -> 0, 32896 -> 128.
    assert pixels(load_rgb(path)) == [(255, 255, 255), (100, 100, 100), (0, 0, 0), (128, 128, 128)]


def test_32bit_int_and_float_greyscale():
    as16 = Image.fromarray(np.array([[65535, 257 * 7]], dtype=np.int32))  # mode I, max <= 65535 -> /257
    assert as16.mode == "I"
    assert pixels(to_rgb8(as16)) == [(255, 255, 255), (7, 7, 7)]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, -0.2]], dtype=np.float32))  # max <= 1 -> *255
    assert pixels(to_rgb8(unit)) == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (0, 0, 0)]
    bytes_range = Image.fromarray(np.array([[10.0, 300.0]], dtype=np.float32))  # max > 1 -> 0..255
    assert pixels(to_rgb8(bytes_range)) == [(10, 10, 10), (255, 255, 255)]


def test_palette_png_with_transparency(tmp_path):
    path = tmp_path / "p.png"
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red, 1 blue
    img.putdata([0, 1])
    img.save(path, transparency=1)  # blue is the transparent index
    assert probe_image(path) == (2, 1, "P")
    assert pixels(load_rgb(path)) == [(255, 0, 0), (255, 255, 255)]


def test_rgba_png_transparency_becomes_white(tmp_path):
    path = tmp_path / "a.png"
    img = Image.new("RGBA", (3, 1))
    img.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 51)])
    img.save(path)
    # Third pixel: 51/255 = 20 % black over white -> 255 * 0.8 = 204.
    assert pixels(load_rgb(path)) == [(255, 255, 255), (255, 0, 0), (204, 204, 204)]


def test_la_and_greyscale(tmp_path):
    grey = tmp_path / "l.png"
    Image.new("L", (1, 1), 77).save(grey)
    assert pixels(load_rgb(grey)) == [(77, 77, 77)]
    la = tmp_path / "la.png"
    Image.new("LA", (1, 1), (0, 0)).save(la)
    assert pixels(load_rgb(la)) == [(255, 255, 255)]


def test_exif_orientation_6(tmp_path):
    path = tmp_path / "rot.jpg"
    img = Image.new("RGB", (16, 8), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(path, exif=exif.tobytes(), quality=95)
    assert probe_image(path) == (8, 16, "RGB")
    rgb = load_rgb(path)
    assert rgb.size == (8, 16)
    # Turning clockwise brings the left edge to the top: red above, blue below.
    assert near(rgb.getpixel((4, 3)), (255, 0, 0))
    assert near(rgb.getpixel((4, 12)), (0, 0, 255))


def test_exif_orientation_in_png_after_pixel_data(tmp_path):
    path = tmp_path / "late.png"
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (6, 2)).save(path, exif=exif.tobytes())
    data = path.read_bytes()
    # Move the eXIf chunk (4-byte length, type, data, CRC) to just before IEND, after the pixel data.
    start = data.index(b"eXIf") - 4
    end = start + 12 + int.from_bytes(data[start : start + 4], "big")
    chunk, rest = data[start:end], data[:start] + data[end:]
    iend = rest.index(b"IEND") - 4
    moved = rest[:iend] + chunk + rest[iend:]
    assert moved.index(b"IDAT") < moved.index(b"eXIf")
    path.write_bytes(moved)
    assert probe_image(path) == (2, 6, "RGB")
    assert load_rgb(path).size == (2, 6)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file_is_bad(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert probe_image(path)[:2] == (48, 48)  # the header is intact
    with pytest.raises(BadImage, match="cut"):
        load_rgb(path)


def test_zero_byte_text_and_missing_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    for path in (empty, text, tmp_path / "missing.png"):
        with pytest.raises(BadImage, match=path.name):
            probe_image(path)
        with pytest.raises(BadImage, match=path.name):
            load_rgb(path)
    assert issubclass(BadImage, FluxpipeError)


def test_resize_and_crop_sizes():
    img = Image.new("RGB", (600, 400))
    out = resize_and_crop(img, (640, 427), 0, 21, (640, 384))
    assert out.size == (640, 384)


def test_crop_without_resize_takes_the_box():
    img = Image.new("L", (4, 4))
    img.putdata(list(range(16)))  # value = 4*y + x
    out = resize_and_crop(img, (4, 4), 1, 2, (2, 2))
    assert pixels(out) == [9, 10, 13, 14]


def test_downscale_averages_areas():
    img = Image.new("L", (4, 2))
    img.putdata([0, 100, 200, 50, 20, 40, 60, 90])
    out = resize_and_crop(img, (2, 1), 0, 0, (2, 1))
    # 2x2 blocks: (0+100+20+40)/4 = 40, (200+50+60+90)/4 = 100.
    assert pixels(out) == [40, 100]


def test_upscale_interpolates():
    img = Image.new("L", (2, 1))
    img.putdata([0, 255])
    out = resize_and_crop(img, (4, 1), 0, 0, (4, 1))
    # Output pixels 1 and 2 sit between the two samples, nearer 0 and nearer 255 respectively:
    # an interpolating filter gives in-between values (box or nearest would give 0 and 255).
    p = pixels(out)
    assert 0 < p[1] < 128 < p[2] < 255


def test_to_tensor():
    img = Image.new("RGB", (2, 1))
    img.putdata([(0, 0, 0), (255, 0, 51)])
    t = to_tensor(img)
    assert t.shape == (3, 1, 2) and t.dtype == torch.float32
    # x/127.5 - 1: 0 -> -1, 255 -> 1, 51 -> -0.6.
    expected = torch.tensor([[[-1.0, 1.0]], [[-1.0, -1.0]], [[-1.0, -0.6]]])
    assert torch.allclose(t, expected, atol=1e-6)


def test_caption_bom_crlf_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbf\r\n   \r\n  a red fox \r\nsecond line\r\n")
    assert read_caption(path) == "a red fox"
    cr = tmp_path / "cr.txt"
    cr.write_bytes(b"\r\rfirst\rsecond")
    assert read_caption(cr) == "first"
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\n \n")
    assert read_caption(blank) == ""


def test_caption_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(FluxpipeError, match="latin1.txt"):
        read_caption(path)


def test_every_reference_interpolation_name_resizes():
    """The reference's resize_interpolation names (OpenCV's linear/cubic/area = Pillow's bilinear/bicubic/box)."""
    from fluxpipe.config.dataset import INTERPOLATIONS

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8))
    out = {name: np.asarray(resize_and_crop(img, (5, 6), 0, 0, (4, 4), name)) for name in INTERPOLATIONS}
    assert {a.shape for a in out.values()} == {(4, 4, 3)}
    for alias, name in (("linear", "bilinear"), ("cubic", "bicubic"), ("area", "box")):
        assert np.array_equal(out[alias], out[name])
    assert np.array_equal(np.asarray(resize_and_crop(img, (5, 6), 0, 0, (4, 4))), out["area"])  # shrinking: area
    assert not np.array_equal(out["nearest"], out["area"])
