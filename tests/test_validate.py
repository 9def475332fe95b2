"""`fluxpipe validate`: the JSON report, the sha256 cache, and one error line + exit 2 for each bad input."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from conftest import write_st
from safetensors.torch import load_file

from fluxpipe.cli import main
from fluxpipe.io.hashing import cached_sha256, sha256_file
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR


def demo_args(demo_dir: Path, **override: Path) -> list[str]:
    files = {
        "flux": demo_dir / FILES["flux"],
        "ae": demo_dir / FILES["ae"],
        "clip-l": demo_dir / FILES["clip_l"],
        "t5xxl": demo_dir / FILES["t5xxl"],
    } | override
    return [w for k, v in files.items() for w in (f"--{k}", str(v))]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", *args])
    return code, capsys.readouterr().err


def test_report_of_the_demo_models(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, cache = tmp_path / "report.json", tmp_path / "hashes.json"
    args = demo_args(demo_dir) + [
        "--clip-tokenizer",
        str(demo_dir / CLIP_DIR),
        "--t5-tokenizer",
        str(demo_dir / T5_DIR),
        "--out",
        str(out),
        "--hash-cache",
        str(cache),
    ]
    assert main(["validate", *args]) == 0
    report = json.loads(out.read_text())
    assert report["variant"] == "dev"
    flux = report["models"]["flux"]
    assert flux["sha256"] == sha256_file(demo_dir / FILES["flux"])
    assert flux["dtypes"] == {"bf16": len(load_file(str(demo_dir / FILES["flux"])))}
    assert flux["parameters"] == sum(v.numel() for v in load_file(str(demo_dir / FILES["flux"])).values())
    assert report["models"]["ae"]["dtypes"] == {"fp32": 176}
    assert report["tokenizers"]["clip_tokenizer"]["vocab_size"] > 512
    assert "ok: flux, ae, clip_l, t5xxl valid (FLUX.1 dev)" in capsys.readouterr().out


def test_hash_cache_sees_an_in_place_edit_with_size_and_mtime_restored(tmp_path: Path) -> None:
    path, cache = tmp_path / "big.bin", tmp_path / "cache.json"
    path.write_bytes(b"a" * 1000)
    first, hit = cached_sha256(path, cache)
    assert not hit and first == sha256_file(path)
    assert cached_sha256(path, cache) == (first, True)  # unchanged: answered without reading
    stat = path.stat()
    time.sleep(0.05)  # past the file system clock's tick
    with open(path, "r+b") as f:  # rewritten in place (same inode), same size, old mtime put back (cp -p, touch -r)
        f.write(b"b" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    second, hit = cached_sha256(path, cache)
    assert not hit and second == hashlib.sha256(b"b" * 1000).hexdigest() != first


def contradicting_header(source: Path, out: Path) -> Path:
    """A copy of ``source`` whose header says img_in.bias is F32 while its byte range holds its BF16 bytes."""
    data = source.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header["img_in.bias"]["dtype"] == "BF16"
    header["img_in.bias"]["dtype"] = "F32"
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    out.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
    return out


def _bad_files(demo_dir: Path, tmp: Path) -> dict[str, tuple[dict[str, Path], str]]:
    cut = tmp / "cut.safetensors"
    data = (demo_dir / FILES["flux"]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    diffusers = tmp / "FLUX.1-dev"
    (diffusers / "transformer").mkdir(parents=True)
    (diffusers / "model_index.json").write_text("{}")
    odd = load_file(str(demo_dir / FILES["flux"]))
    odd["txt_in.weight"] = torch.zeros(64, 7, dtype=torch.bfloat16)  # T5 width 7: no model of this family
    e5m2 = {k: v.to(torch.float8_e5m2) for k, v in load_file(str(demo_dir / FILES["t5xxl"])).items()}
    nan = load_file(str(demo_dir / FILES["flux"]))
    nan["txt_in.weight"].view(-1)[3] = float("nan")
    nan["txt_in.weight"].view(-1)[5] = float("-inf")
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(demo_dir / FILES["t5xxl"])).items()}
    fp8["shared.weight"].view(torch.uint8).view(-1)[7] = 0x7F  # the one NaN pattern of e4m3fn (no Inf exists)
    ints = load_file(str(demo_dir / FILES["ae"]))
    ints["decoder.conv_in.weight"] = ints["decoder.conv_in.weight"].to(torch.int32)
    return {
        "diffusers folder": ({"flux": diffusers}, "Diffusers-format folder"),
        "truncated": ({"flux": cut}, "truncated"),
        "missing": ({"ae": tmp / "ae.safetensors"}, "file not found"),
        "ae as dit": ({"flux": demo_dir / FILES["ae"]}, "is a FLUX.1 autoencoder"),
        "t5 as clip": ({"clip-l": demo_dir / FILES["t5xxl"]}, "is a T5-XXL text encoder"),
        "width mismatch": ({"flux": write_st(tmp / "odd.safetensors", odd)}, "expects context_in_dim=7"),
        "fp8 e5m2": ({"t5xxl": write_st(tmp / "t5_e5m2.safetensors", e5m2)}, "F8_E5M2 is not supported"),
        "nan": (
            {"flux": write_st(tmp / "nan.safetensors", nan)},
            "1 tensors hold NaN/Inf values: txt_in.weight (2 values)",
        ),
        "inf fp8": ({"t5xxl": write_st(tmp / "t5_fp8.safetensors", fp8)}, "shared.weight (1 values)"),
        "int weights": (
            {"ae": write_st(tmp / "ae_int.safetensors", ints)},
            "non-float tensors in float weights: decoder.conv_in.weight is I32",
        ),
        "byte range": (
            {"flux": contradicting_header(demo_dir / FILES["flux"], tmp / "range.safetensors")},
            "tensor 'img_in.bias': the header's byte range",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "diffusers folder",
        "truncated",
        "missing",
        "ae as dit",
        "t5 as clip",
        "width mismatch",
        "fp8 e5m2",
        "nan",
        "inf fp8",
        "int weights",
        "byte range",
    ],
)
def test_each_bad_input_is_one_error_line_and_exit_2(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    override, says = _bad_files(demo_dir, tmp_path)[case]
    out = tmp_path / "report.json"
    code, err = run_cli(
        demo_args(demo_dir, **override) + ["--out", str(out), "--hash-cache", str(tmp_path / "c.json")], capsys
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fluxpipe: error: ") and says in lines[0], err
    assert not out.exists()  # nothing downstream gets a report to depend on


def test_two_bad_files_are_both_named(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(demo_args(demo_dir, ae=tmp_path / "a.safetensors", t5xxl=tmp_path / "t.safetensors"), capsys)
    assert code == 2 and "2 model files are unusable" in err and "a.safetensors" in err and "t.safetensors" in err


def test_nothing_to_validate(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli([], capsys)
    assert code == 2 and "nothing to validate" in err


def test_scan_counts_nonfinite_values_across_chunk_borders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fluxpipe.io.hashing as hashing

    a = torch.tensor([1.0, 2.0, float("nan"), 3.0, float("inf")])  # F32 bytes 0..20: 2 bad
    b = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.bfloat16)  # BF16 20..26: 1 bad
    c = torch.tensor([255, 1, 2], dtype=torch.uint8)  # F8_E4M3 26..29: 0xFF is NaN: 1 bad
    d = torch.tensor([-1], dtype=torch.int32)  # I32 29..33: all bits set, but not a float: ignored
    data = b"".join(t.view(torch.uint8).numpy().tobytes() for t in (a, b, c, d))
    tensors = {"a": ("F32", 0, 20), "b": ("BF16", 20, 26), "c": ("F8_E4M3", 26, 29), "d": ("I32", 29, 33)}
    path = tmp_path / "t.bin"
    path.write_bytes(b"12345" + data)  # data starts at an odd offset: values straddle the 3-byte chunks
    monkeypatch.setattr(hashing, "CHUNK", 3)
    digest, counts = hashing.scan_safetensors(path, 5, tensors)
    assert counts == {"a": 2, "b": 1, "c": 1}
    assert digest == hashlib.sha256(b"12345" + data).hexdigest()
    cache = hashing.HashCache(tmp_path / "c.json")
    assert cache.scan(path, 5, tensors) == (digest, counts, False)
    cache.save()
    assert hashing.HashCache(tmp_path / "c.json").scan(path, 5, tensors) == (digest, counts, True)
