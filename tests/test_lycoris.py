"""LyCORIS (--network_module lycoris.kohya) through the lycoris-lora package: fluxpipe's merge of LoKr / LoHa / LoCon /
full / DoRA files equals the package's own, a training run writes a file both load, a missing package is one line."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors import safe_open
from safetensors.torch import load_file

from fluxpipe.errors import FluxpipeError
from fluxpipe.lora.files import apply_lora
from fluxpipe.lora.lycoris import LycorisFluxNetwork, dora_merge, module_delta
from fluxpipe.models.flux import Flux, tiny

kohya = pytest.importorskip("lycoris.kohya")


def tiny_flux() -> Flux:
    torch.manual_seed(0)
    return Flux(tiny()).float()


def trained_network(dit: Flux, *args: str, alpha: float = 4.0) -> LycorisFluxNetwork:
    """A rank-4 LyCORIS network over ``dit`` with random weights, as after training."""
    net = LycorisFluxNetwork(dit, dict(a.split("=") for a in args), network_dim=4, network_alpha=alpha)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.net.named_parameters():
            if "dora_scale" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net


def trained_file(dit: Flux, *args: str) -> dict[str, torch.Tensor]:
    """The network's file as fluxpipe saves it (alpha = rank: see the scaled test below)."""
    return trained_network(dit, *args).state_dict_kohya(torch.float32)


def lycoris_merge(dit: Flux, sd: dict[str, torch.Tensor], multiplier: float) -> Flux:
    """The package's loader and merge: create_network_from_weights, then each module's merge_to(multiplier) (the
    network's own merge_to merges at 1 whatever the multiplier; used at 1)."""
    model = copy.deepcopy(dit)
    network, _ = kohya.create_network_from_weights(multiplier, None, None, None, model, weights_sd=sd)
    if multiplier == 1.0:
        network.merge_to(None, model, sd, torch.float32, "cpu")
    else:
        for lora in network.unet_loras:
            lora.merge_to(multiplier)
    return model


@pytest.mark.parametrize(
    "args, suffix",
    [
        (("algo=lokr", "factor=4"), "lokr_w2_b"),
        (("algo=lokr", "factor=4", "full_matrix=True"), "lokr_w2"),
        (("algo=lokr", "factor=16", "decompose_both=True"), "lokr_w1_a"),
        (("algo=loha",), "hada_w1_a"),
        (("algo=locon",), "lora_down.weight"),
        (("algo=full",), "diff"),
        (("algo=lokr", "factor=4", "dora_wd=True"), "dora_scale"),
        (("algo=locon", "dora_wd=True"), "dora_scale"),
    ],
)
def test_fluxpipe_merge_equals_the_lycoris_package_merge(args: tuple[str, ...], suffix: str) -> None:
    dit = tiny_flux()
    sd = trained_file(dit, *args)
    assert any(k.endswith("." + suffix) for k in sd), sorted(sd)[:8]
    assert "lora_unet_double_blocks_0_img_attn_qkv" in {k.partition(".")[0] for k in sd}  # kohya module names
    ours = copy.deepcopy(dit)
    count = apply_lora(ours, sd, 0.7)
    theirs = lycoris_merge(dit, sd, 0.7)
    assert count == len({k.partition(".")[0] for k in sd}) == 26  # every Linear of the 2 double + 2 single blocks
    changed = 0
    for (name, a), b, w in zip(
        ours.state_dict().items(), theirs.state_dict().values(), dit.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        changed += not torch.equal(a, w)
    assert changed >= 26


@pytest.mark.parametrize(
    "args",
    [
        ("algo=lokr", "factor=4"),
        ("algo=loha",),
        ("algo=lokr", "factor=4", "dora_wd=True"),
        ("algo=loha", "dora_wd=True", "wd_on_output=False"),  # (the package's loader cannot read this one back)
    ],
)
def test_merge_with_alpha_below_rank_equals_what_the_network_trained(args: tuple[str, ...]) -> None:
    """With alpha != rank the merged layer computes what the package's module computed in training (its forward).
    (lycoris-lora 4.1.3's own merge_to applies alpha/rank twice for LoKr/LoHa, get_weight and get_diff_weight both
    scaling; so only alpha = rank is compared with it above.)"""
    dit = tiny_flux()
    net = trained_network(dit, *args, alpha=2.0)
    merged = copy.deepcopy(dit)
    apply_lora(merged, net.state_dict_kohya(torch.float32), 1.0)
    net.apply_to()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for lora in net.net.unet_loras:
            target = merged.get_submodule(_bfl_path(lora.lora_name))
            if target.in_features != 64:
                continue
            torch.testing.assert_close(target(x), lora(x), rtol=1e-4, atol=1e-5, msg=lora.lora_name)


def _bfl_path(lora_name: str) -> str:
    """lora_unet_double_blocks_0_img_attn_qkv -> double_blocks.0.img_attn.qkv (the tiny model's module names)."""
    rest = lora_name.removeprefix("lora_unet_")
    for head in ("double_blocks_", "single_blocks_"):
        if rest.startswith(head):
            index, _, tail = rest[len(head) :].partition("_")
            for part in ("img_attn_", "txt_attn_", "img_mlp_", "txt_mlp_", "img_mod_", "txt_mod_", "modulation_"):
                if tail.startswith(part):
                    tail = part[:-1] + "." + tail[len(part) :]
            return f"{head[:-1]}.{index}.{tail}"
    raise AssertionError(lora_name)


def test_lokr_and_loha_deltas_by_hand() -> None:
    """LoKr: kron(w1, a @ b) * alpha / rank; LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha / rank."""
    w1 = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    a, b = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 1.0]])
    lokr = module_delta("m", {"lokr_w1": w1, "lokr_w2_a": a, "lokr_w2_b": b, "alpha": torch.tensor(0.5)}).delta
    w2 = torch.tensor([[3.0, 1.0], [6.0, 2.0]])
    expected = torch.cat([torch.cat([w2, 2 * w2], 1), torch.cat([0 * w2, w2], 1)]) * 0.5
    assert torch.equal(lokr, expected)
    loha = module_delta(
        "m", {"hada_w1_a": a, "hada_w1_b": b, "hada_w2_a": 2 * a, "hada_w2_b": b, "alpha": torch.tensor(1.0)}
    ).delta
    assert torch.equal(loha, w2 * (2 * w2))
    # DoRA with magnitude equal to the merged rows' norm and multiplier 1 leaves the weight as it is
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    torch.testing.assert_close(dora_merge(w, torch.tensor([[5.0], [2.0]]), 1.0), w)
    torch.testing.assert_close(dora_merge(w, torch.tensor([[10.0], [2.0]]), 0.5), w * torch.tensor([[1.5], [1.0]]))


def test_missing_lycoris_package_is_one_line_at_parse_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fluxpipe.cli import main
    from fluxpipe.config.reference_flags import parse_train_args
    from fluxpipe.lora.lycoris import lycoris_kohya

    monkeypatch.setitem(sys.modules, "lycoris", None)
    monkeypatch.setitem(sys.modules, "lycoris.kohya", None)
    with pytest.raises(FluxpipeError, match=r"--network_module lycoris.kohya: .*fluxpipe\[lycoris\]"):
        parse_train_args(["--network_module", "lycoris.kohya"])
    with pytest.raises(FluxpipeError, match=r"fluxpipe\[lycoris\]"):
        lycoris_kohya()
    assert main(["train", "lora", "--network_module", "lycoris.kohya", "--output_dir", "unused"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluxpipe: error: --network_module lycoris.kohya"), err


def test_lycoris_needs_unet_only_and_no_fp8() -> None:
    from fluxpipe.commands.train import check_supported
    from fluxpipe.config.reference_flags import parse_train_args

    base = ["--network_module", "lycoris.kohya", "--output_dir", "unused"]
    with pytest.raises(FluxpipeError, match="--network_train_unet_only"):
        check_supported(parse_train_args(base), "cpu")
    with pytest.raises(FluxpipeError, match="--fp8_base"):
        check_supported(parse_train_args(base + ["--network_train_unet_only", "--fp8_base"]), "cpu")


def test_lycoris_network_args_are_checked_at_parse_time() -> None:
    from fluxpipe.config.reference_flags import parse_train_args

    base = ["--network_module", "lycoris.kohya"]
    assert parse_train_args(base + ["--network_args", "algo=lokr", "factor=8", "dora_wd=True"]).network_args
    with pytest.raises(FluxpipeError, match="--network_args img_attn_dim=4: lycoris.kohya takes no key"):
        parse_train_args(base + ["--network_args", "img_attn_dim=4"])


def test_tiny_training_run_writes_a_lokr_file_both_loaders_read(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_train_lora import seed_command

    from fluxpipe.cli import main
    from fluxpipe.inference.sampler import load_lora
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.tools.demo import FILES

    monkeypatch.chdir(REPO)
    argv = seed_command(demo_dir, tmp_path, "--network_train_unet_only", "--max_train_epochs", "1")
    argv[argv.index("networks.lora_flux")] = "lycoris.kohya"
    argv[argv.index("AdamW8bit")] = "AdamW"
    argv[argv.index("--blocks_to_swap") : argv.index("--blocks_to_swap") + 2] = []
    argv[argv.index("fp16")] = "no"
    argv[argv.index("--network_alpha") + 1] = "16"  # = the rank (the package's merge scales alpha/rank twice)
    argv += ["--network_args", "algo=lokr", "factor=4", "--learning_rate", "1e-2"]
    assert main(["train", "lora", *argv]) == 0
    final = tmp_path / "my_flux_lora.safetensors"
    sd = load_file(str(final))
    assert any(k.endswith(".lokr_w1") for k in sd) and any(k.endswith(".lokr_w2") for k in sd)
    assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith(".lokr_w2"))  # (initialised to 0: it trained)
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
    layout, kohya_sd = load_lora(final)  # fluxpipe's sampler path
    dit = load_model(demo_dir / FILES["flux"], "flux", dtype=torch.float32, device="cpu")
    ours = copy.deepcopy(dit)
    assert layout == "kohya" and apply_lora(ours, kohya_sd, 1.0) == len({k.partition(".")[0] for k in sd})
    theirs = lycoris_merge(dit, sd, 1.0)  # the package's own loader
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.workflow
def test_snakemake_train_lora_with_lycoris_on_the_demo(finished_demo: tuple, tmp_path: Path) -> None:
    """The demo pipeline with a LoKr network ends with a LyCORIS file that fluxpipe's sampler path reads."""
    from test_workflow import edited_copy, snakemake

    from fluxpipe.inference.sampler import load_lora

    work = edited_copy(finished_demo[0], tmp_path / "work")  # the demo's caches; its LoRA is trained again
    cfg = work / "config" / "config.yaml"
    text = cfg.read_text()
    for old, new in (
        (
            "  network_module: networks.lora_flux\n",
            "  network_module: lycoris.kohya\n  network_args: [algo=lokr, factor=4]\n",
        ),
        ("  max_train_epochs: 20\n", "  max_train_epochs: 2\n"),
        ("  save_every_n_epochs: 5\n", "  save_every_n_epochs: 1\n"),
    ):
        assert old in text
        text = text.replace(old, new)
    cfg.write_text(text)
    result = snakemake(work, "train_lora")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule train_lora:" in result.stdout + result.stderr  # the network changed: trained again
    final = work / "results/train/lora/demo_lora.safetensors"
    layout, sd = load_lora(final)
    assert layout == "kohya" and any(k.endswith(".lokr_w1") for k in sd)
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"


def test_every_accepted_lycoris_key_is_read_by_the_package() -> None:
    """No --network_args key is accepted that lycoris.kohya.create_network would silently drop."""
    import inspect
    import re

    from fluxpipe.config.names import NETWORK_ARGS

    read = set(re.findall(r'kwargs\.get\("(\w+)"', inspect.getsource(kohya.create_network)))
    assert NETWORK_ARGS["lycoris.kohya"] <= read, NETWORK_ARGS["lycoris.kohya"] - read
