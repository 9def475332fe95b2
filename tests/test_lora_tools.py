"""`fluxpipe lora resize|merge|extract|convert|inspect` against hand-computed results (issue 19, item 3)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxpipe.cli import main
from fluxpipe.tools.demo import FILES
from tests.conftest import write_st

QKV = "lora_unet_double_blocks_0_img_attn_qkv"
MLP = "lora_unet_double_blocks_1_img_mlp_2"


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))[0]


def kohya(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}


def delta(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    down, up = sd[f"{name}.lora_down.weight"].float(), sd[f"{name}.lora_up.weight"].float()
    return up @ down * float(sd[f"{name}.alpha"]) / down.shape[0]


def known_svd_lora(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A rank-4 LoRA on qkv [192, 64] whose delta has singular values 8, 4, 1, 0.5 (scale alpha/rank = 0.5)."""
    u, v = orthonormal(192, 4, 1), orthonormal(64, 4, 2)
    s = torch.tensor([8.0, 4.0, 1.0, 0.5])
    path = write_st(tmp_path / "l.safetensors", kohya(QKV, v.T.contiguous(), u * s * 2, 2.0), {"ss_network_dim": "4"})
    return path, (u * s) @ v.T


def test_resize_keeps_the_delta_of_a_low_rank_product_and_picks_dynamic_ranks(tmp_path: Path) -> None:
    u, v = orthonormal(192, 2, 3), orthonormal(64, 2, 4)
    m = torch.randn(2, 4, generator=torch.Generator().manual_seed(5))
    src = write_st(
        tmp_path / "r4.safetensors", kohya(QKV, (m.T @ v.T).contiguous(), u @ m * 3, 1.0)
    )  # rank 2 in rank 4
    out = tmp_path / "r2.safetensors"
    assert main(["lora", "resize", "--model", str(src), "--save_to", str(out), "--new_rank", "2"]) == 0
    got = load_file(out)
    assert got[f"{QKV}.lora_down.weight"].shape == (2, 64) and float(got[f"{QKV}.alpha"]) == pytest.approx(0.5)
    torch.testing.assert_close(delta(got, QKV), (u @ m * 3) @ (m.T @ v.T) / 4, rtol=1e-4, atol=1e-5)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    n = struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "0.5"
    assert meta["sshs_model_hash"] == hashlib.sha256(out.read_bytes()[8 + n :]).hexdigest()
    known, _ = known_svd_lora(tmp_path)
    # S = 8, 4, 1, 0.5: sv_ratio 5 keeps S > 1.6 (2); sv_cumulative 0.9: 12/13.5 < 0.9 <= 13/13.5 (3);
    # sv_fro 0.95: (64 + 16) / 81.25 >= 0.95^2 (2)
    for method, param, rank in (("sv_ratio", 5, 2), ("sv_cumulative", 0.9, 3), ("sv_fro", 0.95, 2)):
        assert (
            main(
                [
                    "lora",
                    "resize",
                    "--model",
                    str(known),
                    "--save_to",
                    str(out),
                    "--new_rank",
                    "4",
                    "--dynamic_method",
                    method,
                    "--dynamic_param",
                    str(param),
                ]
            )
            == 0
        )
        assert load_file(out)[f"{QKV}.lora_down.weight"].shape[0] == rank, method
    assert main(["lora", "resize", "--model", str(known), "--save_to", str(out), "--new_rank", "8"]) == 2


def test_merge_loras_is_the_weighted_sum(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a = {
        **kohya(QKV, torch.randn(2, 64, generator=g), torch.randn(192, 2, generator=g), 1.0),
        **kohya(MLP, torch.randn(2, 256, generator=g), torch.randn(64, 2, generator=g), 2.0),
    }
    b = kohya(QKV, torch.randn(3, 64, generator=g), torch.randn(192, 3, generator=g), 3.0)
    pa, pb = write_st(tmp_path / "a.safetensors", a), write_st(tmp_path / "b.safetensors", b)
    out = tmp_path / "ab.safetensors"
    assert main(["lora", "merge", "--models", str(pa), str(pb), "--ratios", "0.5", "2", "--save_to", str(out)]) == 0
    got = load_file(out)
    torch.testing.assert_close(delta(got, QKV), 0.5 * delta(a, QKV) + 2 * delta(b, QKV), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(delta(got, MLP), 0.5 * delta(a, MLP), rtol=1e-5, atol=1e-5)
    assert got[f"{QKV}.lora_down.weight"].shape == (5, 64)
    bad = write_st(tmp_path / "bad.safetensors", kohya(QKV, torch.randn(2, 32), torch.randn(96, 2), 1.0))
    assert main(["lora", "merge", "--models", str(pa), str(bad), "--save_to", str(out)]) == 2


def test_merge_into_the_dit_gives_a_strict_loading_file(demo_dir: Path, tmp_path: Path) -> None:
    from fluxpipe.io.checkpoints import load_model

    g = torch.Generator().manual_seed(0)
    lora = kohya(QKV, torch.randn(2, 64, generator=g), torch.randn(192, 2, generator=g), 1.0)
    path = write_st(tmp_path / "l.safetensors", lora)
    out = tmp_path / "merged.safetensors"
    base = demo_dir / FILES["flux"]
    assert (
        main(
            [
                "lora",
                "merge",
                "--models",
                str(path),
                "--ratios",
                "0.5",
                "--flux_model",
                str(base),
                "--save_to",
                str(out),
                "--save_precision",
                "float",
            ]
        )
        == 0
    )
    merged, orig = load_model(out, "flux"), load_file(base)  # strict load: every key, none missing
    want = orig["double_blocks.0.img_attn.qkv.weight"].float() + 0.5 * delta(lora, QKV)
    torch.testing.assert_close(merged.double_blocks[0].img_attn.qkv.weight, want)
    assert torch.equal(
        merged.double_blocks[0].img_attn.proj.weight, orig["double_blocks.0.img_attn.proj.weight"].float()
    )
    wrong = write_st(tmp_path / "w.safetensors", kohya(QKV, torch.randn(2, 32), torch.randn(96, 2), 1.0))
    assert main(["lora", "merge", "--models", str(wrong), "--flux_model", str(base), "--save_to", str(out)]) == 2


def test_extract_reproduces_a_known_delta(demo_dir: Path, tmp_path: Path) -> None:
    base = {k: v.float() for k, v in load_file(demo_dir / FILES["flux"]).items()}
    d = orthonormal(192, 2, 7) @ torch.diag(torch.tensor([0.3, 0.1])) @ orthonormal(64, 2, 8).T
    tuned = dict(base) | {"double_blocks.0.img_attn.qkv.weight": base["double_blocks.0.img_attn.qkv.weight"] + d}
    org, ft = write_st(tmp_path / "org.safetensors", base), write_st(tmp_path / "ft.safetensors", tuned)
    out = tmp_path / "x.safetensors"
    assert (
        main(
            [
                "lora",
                "extract",
                "--model_org",
                str(org),
                "--model_tuned",
                str(ft),
                "--save_to",
                str(out),
                "--dim",
                "2",
                "--clamp_quantile",
                "1",
            ]
        )
        == 0
    )
    got = load_file(out)
    torch.testing.assert_close(delta(got, QKV), d, rtol=1e-4, atol=1e-5)
    assert float(delta(got, MLP).abs().max()) < 1e-6  # untouched layers: no delta
    other = write_st(tmp_path / "other.safetensors", {k: v for k, v in tuned.items() if "single_blocks.1." not in k})
    assert main(["lora", "extract", "--model_org", str(org), "--model_tuned", str(other), "--save_to", str(out)]) == 2


def test_convert_between_layouts_keeps_the_deltas(tmp_path: Path) -> None:
    from fluxpipe.inference.sampler import load_lora

    g = torch.Generator().manual_seed(0)
    lora = {
        **kohya(QKV, torch.randn(2, 64, generator=g), torch.randn(192, 2, generator=g), 1.0),
        **kohya(
            "lora_unet_single_blocks_0_linear1", torch.randn(2, 64, generator=g), torch.randn(448, 2, generator=g), 4.0
        ),
    }
    src = write_st(tmp_path / "k.safetensors", lora)
    for dst, prefix in (("diffusers", "transformer."), ("ai-toolkit", "diffusion_model.")):
        out = tmp_path / f"{dst}.safetensors"
        assert main(["lora", "convert", "--src_path", str(src), "--dst_path", str(out), "--dst", dst]) == 0
        peft = load_file(out)
        # to_q's B is the first 64 rows of up, the scale alpha / rank folded in; proj_mlp the last 256 of linear1
        torch.testing.assert_close(
            peft[f"{prefix}transformer_blocks.0.attn.to_q.lora_B.weight"], lora[f"{QKV}.lora_up.weight"][:64] * 0.5
        )
        torch.testing.assert_close(
            peft[f"{prefix}single_transformer_blocks.0.proj_mlp.lora_B.weight"],
            lora["lora_unet_single_blocks_0_linear1.lora_up.weight"][192:] * 2,
        )
        layout, back = load_lora(out)
        assert layout == dst
        for name in (QKV, "lora_unet_single_blocks_0_linear1"):
            torch.testing.assert_close(delta(back, name), delta(lora, name), rtol=1e-5, atol=1e-5)
    junk = write_st(tmp_path / "junk.safetensors", {"foo.lora_A.weight": torch.zeros(1, 1)})
    assert (
        main(
            [
                "lora",
                "convert",
                "--src_path",
                str(junk),
                "--dst_path",
                str(tmp_path / "j.safetensors"),
                "--dst",
                "kohya",
            ]
        )
        == 2
    )


def test_inspect_reports_ranks_alphas_and_norms(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, d = known_svd_lora(tmp_path)
    assert main(["lora", "inspect", "--model", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["layout"] == "kohya" and report["modules"] == 1 and report["ranks"] == [4] and report["alphas"] == [2.0]
    )
    assert report["delta_norm"]["max"] == pytest.approx(float(torch.tensor([8.0, 4, 1, 0.5]).norm()), rel=1e-5)
    assert report["metadata"] == {"ss_network_dim": "4"}
    assert main(["lora", "inspect", "--model", str(tmp_path / "none.safetensors")]) == 2


@pytest.mark.parametrize("tool", ["resize", "merge", "extract", "convert", "inspect"])
def test_each_tool_has_help(tool: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["lora", tool, "--help"])
    assert e.value.code == 0 and f"fluxpipe lora {tool}" in capsys.readouterr().out


def test_addnet_hashes_by_hand() -> None:
    import hashlib
    import struct

    import torch
    from safetensors.torch import save

    from fluxpipe.lora.files import addnet_hashes

    tensors = {"a.lora_down.weight": torch.arange(300_000, dtype=torch.float32).reshape(3000, 100)}
    blob = save(tensors, {"ss_network_dim": "4"})  # only ss_* metadata takes part
    n = struct.unpack("<Q", blob[:8])[0]
    assert addnet_hashes(tensors, {"ss_network_dim": "4", "modelspec.title": "x"}) == {
        "sshs_model_hash": hashlib.sha256(blob[8 + n :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[1 << 20 : (1 << 20) + 65536]).hexdigest()[:8],
    }
