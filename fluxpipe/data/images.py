"""Robust reading of training images and captions.

Inputs are image files of any common format and mode, and UTF-8 caption text files; outputs are
8-bit RGB Pillow images (EXIF orientation applied, transparency composited on white), resized and
centre-cropped per a fluxpipe.data.buckets.ResizePlan, and [3, H, W] float tensors in [-1, 1].
Bad files raise BadImage / BadCaption (FluxpipeError) naming the file and the problem.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fluxpipe.config.dataset import IMAGE_EXTENSIONS  # noqa: F401 - part of this module's interface
from fluxpipe.errors import FluxpipeError

if TYPE_CHECKING:  # torch is imported by to_tensor: the manifest stage reads images without it
    import torch

EXIF_ORIENTATION = 0x0112
# EXIF orientations 5-8 include a quarter turn, so the displayed image is H x W.
SWAPPED_ORIENTATIONS = (5, 6, 7, 8)
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Errors Pillow raises for damaged data: OSError (truncated, broken stream), SyntaxError (bad PNG
# chunks), ValueError / EOFError / struct.error from some decoders and EXIF blocks; the
# decompression-bomb guard for absurd sizes.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)


class BadImage(FluxpipeError):
    """An image file that cannot be used: missing, empty, not an image, corrupt or truncated."""


class BadCaption(FluxpipeError):
    """A caption file that cannot be read as UTF-8 text."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _check_nonempty(path: Path) -> None:
    if not path.is_file():
        raise BadImage(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise BadImage(f"{path}: image file is empty (0 bytes); re-export or remove it")


def probe_image(path: Path) -> tuple[int, int, str]:
    """(width, height, mode) as displayed (EXIF orientation applied) from the header, no pixel decoding."""
    _check_nonempty(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
            orientation = _orientation(img, path)
    except UnidentifiedImageError as e:
        raise BadImage(f"{path}: not a recognised image file ({e})") from e
    except DECODE_ERRORS as e:
        raise BadImage(f"{path}: cannot read the image header ({e})") from e
    if orientation in SWAPPED_ORIENTATIONS:
        return height, width, mode
    return width, height, mode


def _orientation(img: Image.Image, path: Path) -> int:
    """EXIF orientation tag (1 = as stored) without decoding pixels."""
    if img.format == "PNG" and "exif" not in img.info:
        # Pillow's PNG getexif() decodes the whole image to reach an eXIf chunk after the pixel data;
        # walking the chunk headers finds it without decoding, so probe and load_rgb agree.
        late = _png_late_exif(path)
        if late is None:
            return 1
        exif = Image.Exif()
        exif.load(late)
        return exif.get(EXIF_ORIENTATION, 1)
    return img.getexif().get(EXIF_ORIENTATION, 1)


def _png_late_exif(path: Path) -> bytes | None:
    """Raw eXIf chunk data of a PNG, found by skipping from chunk header to chunk header; None if absent."""
    with open(path, "rb") as f:
        f.seek(8)  # PNG signature
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"eXIf":
                return f.read(length)
            if kind == b"IEND":
                return None
            f.seek(length + 4, 1)  # data and CRC
    return None


def load_rgb(path: Path) -> Image.Image:
    """Fully decoded, EXIF-oriented 8-bit RGB image; transparent areas become white.

    Truncated data is an error: Pillow's LOAD_TRUNCATED_IMAGES is deliberately left off, since a
    half-grey training image is worse than a clear message.
    """
    _check_nonempty(path)
    try:
        with Image.open(path) as img:
            img.load()
            oriented = ImageOps.exif_transpose(img)
    except UnidentifiedImageError as e:
        raise BadImage(f"{path}: not a recognised image file ({e})") from e
    except DECODE_ERRORS as e:
        raise BadImage(f"{path}: corrupt or truncated image data ({e}); re-export or remove it") from e
    try:
        return to_rgb8(oriented)
    except ValueError as e:
        raise BadImage(f"{path}: cannot convert image mode {oriented.mode!r} to RGB ({e})") from e


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: high-bit-depth greyscale is scaled (not clipped) to 0..255,
    alpha and palette transparency are composited on white, CMYK / 1 / L / others use Pillow's convert."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return Image.fromarray(_grey_to_uint8(img)).convert("RGB")
    if img.mode in ALPHA_MODES or img.mode == "P" or "transparency" in img.info:
        return _composite_on_white(img.convert("RGBA"))
    return img.convert("RGB")


def _grey_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale one-channel integer/float pixels to uint8: 16-bit /257, float in 0..1 (or 0..255 if max > 1)."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0)
        # Float images come either normalised to 0..1 or as plain 0..255 values.
        scaled = values if values.max(initial=0.0) > 1.0 else values * 255.0
    elif img.mode == "I" and values.max(initial=0.0) > 65535:
        scaled = values * (255.0 / (2**31 - 1))  # genuinely 32-bit data: map the int32 range
    else:
        scaled = values / 257.0  # 65535 / 257 = 255 exactly, so 16-bit white stays white
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# the reference's resize_interpolation names as Pillow filters (it resizes lanczos/box with PIL, the others with
# OpenCV: linear = bilinear, cubic = bicubic; OpenCV's area averaging is Pillow's box filter)
RESAMPLING = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "box": Image.Resampling.BOX,
}


def resize_and_crop(
    img: Image.Image,
    resized: tuple[int, int],
    crop_left: int,
    crop_top: int,
    bucket: tuple[int, int],
    interpolation: str | None = None,
) -> Image.Image:
    """Scale to `resized` with `interpolation` (a RESAMPLING name; None: area averaging when shrinking, Lanczos
    when enlarging, as the reference's defaults), then crop the bucket-sized box at (crop_left, crop_top)."""
    size = (resized[0], resized[1])  # (also from a list)
    if img.size != size:
        grows = size[0] * size[1] > img.size[0] * img.size[1]
        method = RESAMPLING[interpolation or ("lanczos" if grows else "area")]
        img = img.resize(size, method)
    box = (crop_left, crop_top, crop_left + bucket[0], crop_top + bucket[1])
    if box[2] > img.size[0] or box[3] > img.size[1] or crop_left < 0 or crop_top < 0:
        raise ValueError(f"crop box {box} does not fit in the resized image {img.size}")
    return img.crop(box)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1] (x / 127.5 - 1) from an RGB image."""
    if img.mode != "RGB":
        raise ValueError(f"to_tensor needs an RGB image, got mode {img.mode!r} (use load_rgb)")
    import torch

    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # copy: Pillow's buffer is read-only
    return pixels.permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0


def read_caption(path: Path, all_lines: bool = False) -> str:
    """The first non-empty line of a UTF-8 caption (BOM allowed, CRLF/CR line ends), stripped; '' if none.
    ``all_lines`` (wildcard captions, as the reference): every non-empty stripped line, joined by newlines."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError as e:
        raise BadCaption(f"{path}: caption file not found") from e
    except UnicodeDecodeError as e:
        raise BadCaption(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason}); re-save the caption as UTF-8") from e
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]
    return "\n".join(lines) if all_lines else (lines[0] if lines else "")
