"""The header reader: every valid header length loads; pickle and zip files are still refused by what they are."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxpipe.errors import CheckpointError
from fluxpipe.io.safetensors_file import read_header

LENGTHS = range(8, 4097, 8)


def hand_built(path: Path, n: int) -> Path:
    """A safetensors file whose header is exactly ``n`` bytes: JSON padded with spaces (one F32 [1] tensor when
    it fits, else the empty file ``{}``)."""
    blob = json.dumps({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, separators=(",", ":")).encode()
    data = struct.pack("<f", 1.5)
    if len(blob) > n:
        blob, data = b"{}", b""
    path.write_bytes(struct.pack("<Q", n) + blob + b" " * (n - len(blob)) + data)
    return path


def test_every_hand_built_header_length_loads(tmp_path: Path) -> None:
    for n in LENGTHS:
        path = hand_built(tmp_path / f"h{n}.safetensors", n)
        with safe_open(str(path), framework="pt") as f:  # the real library agrees the file is valid
            names = list(f.keys())
        header = read_header(path)
        assert sorted(header.tensors) == names, n
        assert path.read_bytes()[:8] == struct.pack("<Q", n)


def test_every_header_length_written_by_safetensors_loads(tmp_path: Path) -> None:
    seen: set[int] = set()
    for k in range(0, 4200):
        path = tmp_path / "lib.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pad": "x" * k})
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        if n > 4096:
            break
        if n in seen:
            continue
        seen.add(n)
        assert read_header(path).tensors["w"].shape == (2,), n
    assert {128, 384, 640, 896} <= seen  # lengths whose first byte is 0x80 (the old code refused them)
    assert len(seen) > 450


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("obj", [1, {"x": [1.0] * 3}, "a" * 1000])
def test_real_pickles_are_refused(tmp_path: Path, protocol: int, obj: object) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(CheckpointError, match="pickle/zip.*never unpickles"):
        read_header(path)


@pytest.mark.parametrize("payload", [b"", b"x" * 100, b"y" * 70000])
def test_real_zips_are_refused(tmp_path: Path, payload: bytes) -> None:
    buffer = io.BytesIO()  # the layout of torch.save: a zip archive holding data.pkl and the tensor bytes
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
        z.writestr("archive/data/0", payload)
        z.writestr("archive/version", "3\n")
    path = tmp_path / "model.safetensors"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="pickle/zip.*never unpickles"):
        read_header(path)


def test_torch_save_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    torch.save({"x": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="pickle/zip.*never unpickles"):
        read_header(path)
