"""Safe, strict access to ``.safetensors`` files: header checks, pickle refusal, atomic writes.

``read_header`` parses and checks the header without reading tensor data (a 24 GB file costs one
small read), so truncated or corrupt files are reported before any model is built. Pickle-based
formats (.ckpt/.pt/.pth/.bin or pickle/zip bytes under any name) are refused: they can run code.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fluxpipe.errors import CheckpointError
from fluxpipe.io.atomic import no_space_error, publish, temp_beside

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
DTYPE_NAMES = {
    "F64": "fp64",
    "F32": "fp32",
    "F16": "fp16",
    "BF16": "bf16",
    "F8_E4M3": "fp8_e4m3fn",
    "F8_E5M2": "fp8_e5m2",
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)  # byte range in the data section (after the header)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int = 0  # file offset of the data section: 8 + header length

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: t.shape for k, t in self.tensors.items()}


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: {path.suffix} files are pickle-based and can run code when loaded; fluxpipe reads only "
            ".safetensors (convert the file with a trusted tool, or download the .safetensors release)"
        )


def looks_like_pickle_or_zip(path: Path) -> bool:
    """A zip archive (torch.save's format: found by its end-of-archive record) or a protocol 2-5 pickle stream.
    Asked only of files that are not valid safetensors: a safetensors file begins with its little-endian header
    length, whose first bytes can be anything (0x80 for 1 header length in 32)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_header(path: str | Path) -> Header:
    """Parse and check a safetensors header: missing file, pickle bytes, truncation and corruption all raise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: file not found (check the path in config/config.yaml or on the command line)")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give the path of a single .safetensors file")
    refuse_pickle(path)
    try:
        return _parse_header(path)
    except CheckpointError:
        if looks_like_pickle_or_zip(path):
            raise CheckpointError(
                f"{path}: holds pickle/zip (torch.save) data, not safetensors; fluxpipe never "
                "unpickles (convert it with a trusted tool, or download the .safetensors release)"
            ) from None
        raise


def _parse_header(path: Path) -> Header:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{path}: {size} bytes is too short for a safetensors file (empty or truncated download)"
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, "
                f"file has {size}); download the file again"
            )
        try:
            raw = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"{path}: corrupt safetensors header ({e.__class__.__name__}); download it again"
            ) from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); download it again")
    metadata = raw.pop("__metadata__", None) or {}
    tensors, end = {}, 0
    for key, entry in raw.items():
        try:
            start, stop = (int(o) for o in entry["data_offsets"])
            tensors[key] = TensorInfo(
                dtype=entry["dtype"], shape=tuple(int(s) for s in entry["shape"]), offsets=(start, stop)
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}; download it again") from e
        check_byte_range(path, key, tensors[key], start, stop)
        end = max(end, stop)
    data = size - 8 - n
    if data < end:
        raise CheckpointError(
            f"{path}: truncated: the header describes {end} bytes of tensor data but the file holds "
            f"{data}; the download or copy was interrupted, fetch the file again"
        )
    return Header(path=path, tensors=tensors, metadata=metadata, data_start=8 + n)


def check_byte_range(path: Path, key: str, info: TensorInfo, start: int, stop: int) -> None:
    """The header's byte range of a tensor must hold exactly shape x dtype size bytes."""
    if info.dtype not in ITEMSIZE:
        raise CheckpointError(
            f"{path}: tensor {key!r} has unknown dtype {info.dtype!r}; the file is corrupt or not a "
            "model file fluxpipe reads"
        )
    want = info.numel * ITEMSIZE[info.dtype]
    if start < 0 or stop - start != want:
        raise CheckpointError(
            f"{path}: tensor {key!r}: the header's byte range [{start}, {stop}) holds {stop - start} "
            f"bytes but {info.dtype} {list(info.shape)} needs {want}; the file is corrupt (its "
            "header contradicts itself): download or export it again"
        )


def read_tensors(
    path: str | Path, keys: Mapping[str, str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Memory-mapped read of ``keys`` (file key -> returned key), cast to ``dtype`` when given."""
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for file_key, key in keys.items():
            t = f.get_tensor(file_key)
            out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        publish(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if (full := no_space_error(e, path)) is not None:
            raise full from None
        raise


def canonical_header(tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> bytes:
    """The header's meaning as canonical JSON bytes (what a content digest covers besides the data bytes)."""
    entries: dict[str, object] = {
        k: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.offsets)} for k, t in tensors.items()
    }
    entries["__metadata__"] = dict(metadata)
    return json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()


def _raw_bytes(t: torch.Tensor) -> memoryview:
    data = t.detach().contiguous().cpu().reshape(-1)
    return data.view(torch.uint8).numpy().data if data.numel() else memoryview(b"")


def save_safetensors_streaming(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    fetch: Callable[[torch.Tensor], torch.Tensor] | None = None,
    digest_key: str | None = None,
) -> str | None:
    """The same file as ``save_safetensors``, written one tensor at a time (``--mem_eff_save``): the host never
    holds more than one tensor's bytes beyond the model itself (a 24 GB DiT saves without 24 GB of extra RAM).
    Header first (offsets from shapes and dtypes, padded to 8 bytes), then the data in header order; atomic.
    ``fetch`` turns each tensor into the one written, as it is reached (e.g. gathers an FSDP shard).
    With ``digest_key`` (no ``fetch``), the metadata also records under that key the sha256 of
    ``canonical_header`` + the data bytes, computed from the tensors in memory as they are written; it is
    returned, and ``content_digest`` recomputes it from the file."""
    codes = {v: k for k, v in DTYPES.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    infos, offset = {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        infos[name] = TensorInfo(dtype=codes[t.dtype], shape=tuple(t.shape), offsets=(offset, offset + size))
        offset += size
    meta, digest = dict(metadata or {}), None
    if digest_key is not None:
        assert fetch is None, "a digest is computed from tensors in memory"
        h = hashlib.sha256(canonical_header(infos, meta))
        for t in tensors.values():
            h.update(_raw_bytes(t))
        digest = meta[digest_key] = h.hexdigest()
    header: dict[str, object] = {"__metadata__": meta} if meta else {}
    header.update(
        {k: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": list(i.offsets)} for k, i in infos.items()}
    )
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for t in tensors.values():
                f.write(_raw_bytes(fetch(t) if fetch is not None else t))
            f.flush()
        publish(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if (full := no_space_error(e, path)) is not None:
            raise full from None
        raise
    return digest


def content_digest(path: str | Path, digest_key: str, chunk: int = 16 << 20) -> tuple[str | None, str]:
    """(digest recorded under ``digest_key``, digest of the file as it is now), the data streamed once."""
    header = read_header(path)
    meta = dict(header.metadata)
    recorded = meta.pop(digest_key, None)
    h = hashlib.sha256(canonical_header(header.tensors, meta))
    with open(header.path, "rb") as f:
        f.seek(header.data_start)
        while block := f.read(chunk):
            h.update(block)
    return recorded, h.hexdigest()
