"""`fluxpipe train lora --model_type chroma` on the demo set with the tiny Chroma file, its refusals (one line,
exit 2), the LoRA's key layout and metadata, and Chroma sampling (T5 mask, guidance 0, real CFG)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors import safe_open

from fluxpipe.cli import main
from fluxpipe.tools.demo import FILES, write_chroma_demo
from tests.test_train_lora import seed_command

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _from_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def chroma_command(demo: Path, chroma: Path, out: Path, *extra: str) -> list[str]:
    args = seed_command(demo, out, "--model_type", "chroma", "--apply_t5_attn_mask", *extra)
    i = args.index("--clip_l")
    del args[i : i + 2]
    args[args.index("--pretrained_model_name_or_path") + 1] = str(chroma)
    args[args.index("--guidance_scale") + 1] = "0"
    args[args.index("--max_train_epochs") + 1] = "1"
    args[args.index("--mixed_precision") + 1] = "no"
    return args


def test_train_lora_chroma_on_the_demo_set(demo_dir: Path, tmp_path: Path) -> None:
    chroma = write_chroma_demo(tmp_path / "models")
    out = tmp_path / "run"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube --n blurry --l 4 --w 64 --h 64 --s 2 --d 1\n")
    extra = ("--sample_prompts", str(prompts), "--sample_at_first")
    assert main(["train", "lora", *chroma_command(demo_dir, chroma, out, *extra)]) == 0
    assert len(list((out / "sample").glob("my_flux_lora_*_00_*_1.png"))) == 1  # --sample_at_first
    with safe_open(str(out / "my_flux_lora.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        up = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
    modules = {k.rsplit(".", 2)[0] for k in keys}
    # the reference's layout: every Linear of the 2 double and 2 single blocks, none of the approximator
    double = {
        f"lora_unet_double_blocks_{i}_{s}_{n}"
        for i in range(2)
        for s in ("img", "txt")
        for n in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")
    }
    single = {f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in ("linear1", "linear2")}
    assert modules == double | single
    assert meta["ss_base_model_version"] == "chroma"
    assert meta["modelspec.architecture"] == "chroma/lora"
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert meta["ss_model_type"] == "chroma" and meta["ss_guidance_scale"] == "0.0"
    assert up.abs().max() > 0  # trained away from the zero initialisation
    # the file merges into a Chroma DiT (every module found) and changes its prediction
    from fluxpipe.inference.sampler import load_lora, split_lora
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.lora.files import apply_lora
    from tests.test_chroma_reference import make_inputs

    inp = make_inputs(1, 2, 2)
    inp = {k: v.float() for k, v in inp.items()}
    inp["txt"] = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    dit = load_model(chroma, "chroma", dtype=torch.float32)
    with torch.no_grad():
        before = dit(**inp, txt_attention_mask=mask)
        assert apply_lora(dit, split_lora(load_lora(out / "my_flux_lora.safetensors")[1])["lora_unet"], 1.0) == 20
        assert not torch.allclose(dit(**inp, txt_attention_mask=mask), before, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--apply_t5_attn_mask"], "--model_type chroma: Chroma needs the T5 attention mask: add --apply_t5_attn_mask"),
        (["--guidance_scale", "0", "--guidance_scale", "3.5"], "--guidance_scale 3.5: Chroma trains with 0"),
        (["--clip_l"], "Chroma uses no CLIP-L text encoder; leave --clip_l out"),
        (["--model_type", "chroma", "--model_type", "flux"], "but was loaded as a FLUX.1 DiT"),
    ],
)
def test_chroma_refusals_are_one_line(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: list[str], message: str
) -> None:
    chroma = write_chroma_demo(tmp_path / "models")
    args = chroma_command(demo_dir, chroma, tmp_path / "run")
    if change == ["--apply_t5_attn_mask"]:
        args.remove("--apply_t5_attn_mask")
    elif change == ["--clip_l"]:
        args += ["--clip_l", str(demo_dir / FILES["clip_l"])]
    else:
        args += change[2:]
    assert main(["train", "lora", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxpipe: error: ") and err.count("\n") == 1  # refused before any work (no progress bar)
    assert message in err
    assert not (tmp_path / "run").exists()


def test_flux_file_with_model_type_chroma_is_one_line(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = chroma_command(demo_dir, demo_dir / FILES["flux"], tmp_path / "run")
    assert main(["train", "lora", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxpipe: error: ") and err.count("\n") == 1
    assert err.rstrip().endswith("use --model_type flux")


@pytest.mark.parametrize("method", ["full", "controlnet"])
def test_chroma_trains_loras_only(method: str) -> None:
    from fluxpipe.config.model_types import check_chroma
    from fluxpipe.config.reference_flags import parse_train_args
    from fluxpipe.errors import FluxpipeError

    flags = ["--network_module", "networks.lora_flux", "--model_type", "chroma", "--apply_t5_attn_mask"]
    ns = parse_train_args([*flags, "--guidance_scale", "0"])
    check_chroma(ns, "lora")  # the LoRA trainer takes these flags
    with pytest.raises(FluxpipeError, match=f"only LoRA training supports Chroma \\(not `train {method}`\\)"):
        check_chroma(ns, method)
