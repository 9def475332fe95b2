"""The EMA of the trained weights (fluxpipe.training.ema; --ema_decay and its options): the maths by hand, the files of
the three trainers against an EMA computed by hand from their per-step files, and exact resume with an EMA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors import safe_open
from safetensors.torch import load_file

from fluxpipe.cli import main
from fluxpipe.training.ema import Ema, EmaSettings, warmup_decay


@pytest.fixture(autouse=True)
def _from_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the demo dataset TOML names its images relative to the repository


def test_warmup_decay_is_diffusers_ema_model_s_by_hand() -> None:
    assert warmup_decay(0.999, 0) == 0.0  # the first update copies the weights
    assert warmup_decay(0.999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.999, 5) == pytest.approx(6 / 15)
    assert warmup_decay(0.5, 8) == pytest.approx(9 / 18)  # = 0.5: the cap is reached at the 10th update
    assert warmup_decay(0.5, 9) == 0.5  # 10 / 19 > 0.5


def test_three_updates_by_hand_and_every_second_step() -> None:
    p = torch.nn.Parameter(torch.tensor([2.0, 4.0]))
    ema = Ema(EmaSettings(decay=0.9), {"p": p})
    assert ema.shadow[0] is not p and torch.equal(ema.shadow[0], p.detach())
    for step, value in ((1, [2.0, 4.0]), (2, [4.0, 8.0]), (3, [0.0, 0.0])):
        p.data = torch.tensor(value)
        assert ema.update(step)
    # 1: d 0 -> [2, 4]; 2: d 2/11 -> 2/11 [2, 4] + 9/11 [4, 8] = [40/11, 80/11]; 3: d 3/12 -> [10/11, 20/11]
    torch.testing.assert_close(ema.shadow[0], torch.tensor([10 / 11, 20 / 11]))
    assert ema.updates == 3
    every2 = Ema(EmaSettings(decay=0.9, update_every=2), {"p": p})
    p.data = torch.tensor([1.0, 1.0])
    assert not every2.update(1) and every2.updates == 0 and torch.equal(every2.shadow[0], torch.zeros(2))
    assert every2.update(2) and torch.equal(every2.shadow[0], torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("on_cpu", [False, True])
def test_swapped_holds_the_ema_and_restores_the_weights_exactly(dtype: torch.dtype, on_cpu: bool) -> None:
    raw = torch.tensor([0.1, -0.3, 7.0], dtype=dtype)
    p = torch.nn.Parameter(raw.clone())
    ema = Ema(EmaSettings(decay=0.9, on_cpu=on_cpu), {"p": p})
    ema.shadow[0].copy_(torch.tensor([1.5, 2.5, 3.5]))
    calls = []
    ema.on_change = lambda: calls.append(1)
    with ema.swapped():
        assert torch.equal(p.detach(), torch.tensor([1.5, 2.5, 3.5], dtype=dtype))
    assert torch.equal(p.detach(), raw) and p.dtype == dtype
    assert torch.equal(ema.shadow[0], torch.tensor([1.5, 2.5, 3.5])) and ema.shadow[0].dtype == torch.float32
    assert len(calls) == 2


def test_a_large_update_goes_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    import fluxpipe.training.ema

    monkeypatch.setattr(fluxpipe.training.ema, "CHUNK_BYTES", 8)  # two float32 values a chunk
    params = [torch.full((n,), float(n)) for n in (1, 1, 3, 2)]
    shadow = [torch.zeros(n) for n in (1, 1, 3, 2)]
    fluxpipe.training.ema.ema_update(shadow, [p.to(torch.bfloat16) for p in params], 0.75)
    assert all(torch.equal(s, p / 4) for s, p in zip(shadow, params, strict=True))


@pytest.mark.gpu
def test_weights_on_the_gpu_and_the_ema_in_host_memory() -> None:
    raw = torch.tensor([0.1, -0.3, 7.0], device="cuda")
    p = torch.nn.Parameter(raw.clone())
    ema = Ema(EmaSettings(decay=0.9, on_cpu=True), {"p": p})
    assert ema.shadow[0].device.type == "cpu"
    p.data = torch.tensor([1.0, 2.0, 3.0], device="cuda")
    ema.update(1)
    p.data = torch.tensor([12.0, 13.0, 14.0], device="cuda")
    ema.update(2)  # 2/11 [1, 2, 3] + 9/11 [12, 13, 14] = [10, 11, 12]
    torch.testing.assert_close(ema.shadow[0], torch.tensor([10.0, 11.0, 12.0]))
    with ema.swapped():
        torch.testing.assert_close(p.detach().cpu(), ema.shadow[0])
    assert torch.equal(p.detach(), torch.tensor([12.0, 13.0, 14.0], device="cuda"))


def test_state_round_trip_and_a_foreign_state_is_refused() -> None:
    p = torch.nn.Parameter(torch.tensor([3.0]))
    a = Ema(EmaSettings(decay=0.9), {"p": p})
    a.update(1)
    b = Ema(EmaSettings(decay=0.9), {"p": torch.nn.Parameter(torch.zeros(1))})
    b.load_state_dict(a.state_dict())
    assert b.updates == 1 and torch.equal(b.shadow[0], torch.tensor([3.0]))
    with pytest.raises(ValueError, match="other weights"):
        b.load_state_dict({"updates": 1, "shadow": {"q": torch.zeros(1)}})


def hand_ema(per_step: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The EMA of the weights after each update, in float64, with diffusers' warm-up written out."""
    shadow: dict[str, torch.Tensor] = {}
    for n, weights in enumerate(per_step):  # n earlier updates
        d = 0.0 if n == 0 else min(decay, (1 + n) / (10 + n))
        shadow = {k: (d * shadow[k] if n else 0.0) + (1 - d) * v.double() for k, v in weights.items()}
    return shadow


def assert_matches(ema_file: Path, expected: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    got = load_file(str(ema_file))
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k].double(), expected[k].to(got[k].dtype).double(), rtol=rtol, atol=1e-7)


def lora_command(demo: Path, out: Path, *extra: str) -> list[str]:
    from test_train_lora import seed_command

    args = seed_command(demo, out, "--save_every_n_steps", "1", "--ema_decay", "0.5", *extra)
    args[args.index("--max_train_epochs") + 1] = "1"  # 5 steps
    return args


def test_lora_ema_file_is_the_ema_of_the_per_step_weights_and_resumes_exactly(demo_dir: Path, tmp_path: Path) -> None:
    one, chain = tmp_path / "one", tmp_path / "chain"
    assert main(["train", "lora", *lora_command(demo_dir, one)]) == 0
    name = "my_flux_lora"
    steps = [one / f"{name}-step{s:08d}.safetensors" for s in range(1, 5)] + [one / f"{name}.safetensors"]
    expected = hand_ema([load_file(str(p)) for p in steps], 0.5)
    assert_matches(one / f"{name}-ema.safetensors", expected)
    assert_matches(one / f"{name}-step00000002-ema.safetensors", hand_ema([load_file(str(p)) for p in steps[:2]], 0.5))
    with safe_open(str(one / f"{name}-ema.safetensors"), "pt") as f, safe_open(str(steps[-1]), "pt") as g:
        ema_meta, raw_meta = f.metadata(), g.metadata()
    assert ema_meta["ss_ema_decay"] == "0.5" and ema_meta["ss_ema_updates"] == "5"
    assert ema_meta["ss_network_dim"] == raw_meta["ss_network_dim"] == "16" and ema_meta["ss_steps"] == "5"
    assert ema_meta["sshs_model_hash"] != raw_meta["sshs_model_hash"]  # the hashes are the EMA file's own
    from fluxpipe.inference.sampler import load_lora  # what `fluxpipe sample --lora` reads

    assert load_lora(one / f"{name}-ema.safetensors")[0] == load_lora(steps[-1])[0]
    # killed after step 3 (a segment), resumed: the same EMA, bit for bit
    assert main(["train", "lora", *lora_command(demo_dir, chain), "--stop_at_step", "3"]) == 0
    state = chain / f"{name}-seg00000003-state"
    assert json.loads((state / "state.json").read_text())["extra"]  # the EMA travels in the state's tensors
    assert main(["train", "lora", *lora_command(demo_dir, chain), "--resume", str(state)]) == 0
    a, b = load_file(str(one / f"{name}-ema.safetensors")), load_file(str(chain / f"{name}-ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_for_eval_validates_the_ema_and_leaves_the_training_unchanged(demo_dir: Path, tmp_path: Path) -> None:
    runs = {}
    for tag, extra in (("ema", ()), ("eval", ("--ema_for_eval",))):
        out = tmp_path / tag
        assert main(["train", "lora", *lora_command(demo_dir, out, *extra)]) == 0
        runs[tag] = load_file(str(out / "my_flux_lora.safetensors"))
        runs[tag + "-ema"] = load_file(str(out / "my_flux_lora-ema.safetensors"))
        runs[tag + "-val"] = [
            json.loads(x)["loss"] for x in (out / "my_flux_lora-validation.jsonl").read_text().splitlines()
        ]
    for k in runs["ema"]:  # the raw weights were restored exactly after each validation
        assert torch.equal(runs["ema"][k], runs["eval"][k]) and torch.equal(runs["ema-ema"][k], runs["eval-ema"][k])
    assert runs["ema-val"][0] == runs["eval-val"][0]  # before training the EMA is the starting LoRA
    assert runs["ema-val"][1] != runs["eval-val"][1]  # after the epoch: the EMA's loss, not the raw weights'


def test_full_fine_tune_ema_on_cpu_every_second_step(demo_dir: Path, tmp_path: Path) -> None:
    from test_train_full import full_command

    args = full_command(
        demo_dir, tmp_path, "--save_every_n_steps", "1", "--ema_decay", "0.9", "--ema_update_every", "2", "--ema_on_cpu"
    )
    for flag in ("--full_bf16", "--save_precision"):  # fp32 weights: the files hold them exactly
        i = args.index(flag)
        del args[i : i + (2 if flag == "--save_precision" else 1)]
    assert main(["train", "full", *args]) == 0
    losses = (tmp_path / "ft-loss.jsonl").read_text().splitlines()
    total = len(losses)
    files = [
        tmp_path / (f"ft-step{s:08d}.safetensors" if s < total else "ft.safetensors") for s in range(2, total + 1, 2)
    ]
    assert_matches(tmp_path / "ft-ema.safetensors", hand_ema([load_file(str(p)) for p in files], 0.9))
    assert (tmp_path / "ft-000001-ema.safetensors").is_file()


def test_controlnet_ema_by_hand_and_after_a_resume(demo_dir: Path, tmp_path: Path) -> None:
    from test_train_controlnet import cn_command

    def command(out: Path) -> list[str]:
        return cn_command(demo_dir, out, "--save_every_n_steps", "1", "--ema_decay", "0.99")

    one, chain = tmp_path / "one", tmp_path / "chain"
    assert main(["train", "controlnet", *command(one)]) == 0
    total = len((one / "cn-loss.jsonl").read_text().splitlines())
    files = [one / f"cn-step{s:08d}.safetensors" for s in range(1, total)] + [one / "cn.safetensors"]
    assert_matches(one / "cn-ema.safetensors", hand_ema([load_file(str(p)) for p in files], 0.99))
    assert main(["train", "controlnet", *command(chain), "--stop_at_step", "2"]) == 0
    assert main(["train", "controlnet", *command(chain), "--resume", str(chain / "cn-seg00000002-state")]) == 0
    a, b = load_file(str(one / "cn-ema.safetensors")), load_file(str(chain / "cn-ema.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the full fine-tune's state code (shared): exact


@pytest.mark.parametrize(
    ("method", "extra", "message"),
    [
        ("lora", ["--ema_on_cpu"], "--ema_on_cpu: needs --ema_decay"),
        ("lora", ["--ema_decay", "1.0"], "--ema_decay: 1.0 must be between 0 and 1"),
        ("full", ["--ema_decay", "0.9", "--ema_update_every", "0"], "--ema_update_every: 0 must be >= 1"),
        ("controlnet", ["--ema_for_eval"], "--ema_for_eval: needs --ema_decay"),
    ],
)
def test_bad_ema_flags_are_one_line(
    method: str, extra: list[str], message: str, demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_train_controlnet import cn_command
    from test_train_lora import seed_command

    command = seed_command if method == "lora" else cn_command
    assert main(["train", method, *command(demo_dir, tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_fsdp_refuses_an_ema_in_one_line() -> None:
    from fluxpipe.errors import FluxpipeError
    from fluxpipe.parallel.distributed import World
    from fluxpipe.training.configs import TrainFullConfig, check_parallel

    cfg = TrainFullConfig(
        flux=Path("f"),
        manifest=Path("m"),
        latent_index=Path("l"),
        text_index=Path("t"),
        output_dir=Path("o"),
        output_name="ft",
        batch_sizes={0: 1},
        variant="dev",
        ema=EmaSettings(decay=0.9),
    )
    with pytest.raises(FluxpipeError, match="--ema_decay: the EMA of FSDP-sharded weights is not implemented"):
        check_parallel(cfg, World(rank=0, size=2), sharded=True)
    check_parallel(cfg, World(rank=0, size=2), sharded=False)  # (ControlNet under DDP: every rank updates its EMA)


def test_the_settings_digest_counts_the_decay_not_where_the_ema_lives() -> None:
    import argparse

    from fluxpipe.commands.train import settings_digest
    from fluxpipe.config.reference_flags import parse_train_args

    base = ["--network_module", "networks.lora_flux"]
    plain = parse_train_args(base)
    before = argparse.Namespace(**{k: v for k, v in vars(plain).items() if not k.startswith("ema_")})
    assert settings_digest(plain) == settings_digest(before)  # states of runs before the EMA flags still resume
    ema = settings_digest(parse_train_args([*base, "--ema_decay", "0.9"]))
    assert ema != settings_digest(plain)
    assert ema != settings_digest(parse_train_args([*base, "--ema_decay", "0.99"]))
    assert ema == settings_digest(parse_train_args([*base, "--ema_decay", "0.9", "--ema_on_cpu", "--ema_for_eval"]))
    assert ema != settings_digest(parse_train_args([*base, "--ema_decay", "0.9", "--ema_update_every", "2"]))


def test_pruning_an_old_step_file_removes_its_ema_file_too(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from fluxpipe.training.saving import prune_old

    cfg = SimpleNamespace(
        output_dir=tmp_path,
        output_name="x",
        save_last_n_steps=2,
        save_last_n_steps_state=None,
        save_last_n_epochs=None,
        save_last_n_epochs_state=None,
    )
    for step in (1, 2, 3):
        for tail in ("", "-ema"):
            (tmp_path / f"x-step{step:08d}{tail}.safetensors").write_bytes(b"")
    prune_old(cfg, "step", 3, 1)  # keep the last 2 steps' files: step 1's go
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x-step00000002-ema.safetensors",
        "x-step00000002.safetensors",
        "x-step00000003-ema.safetensors",
        "x-step00000003.safetensors",
    ]


def test_two_processes_keep_the_ema_of_one(demo_dir: Path, tmp_path: Path) -> None:
    """DDP (LoRA): every rank updates the same EMA, rank 0 writes it; equal to one process's to float tolerance."""
    from test_distributed import _batch1, _run, _worst

    def args(out: Path, dataset: Path | None = None) -> list[str]:
        a = lora_command(demo_dir, out, "--network_train_unet_only", "--optimizer_type", "AdamW")
        a[a.index("--dataset_config") + 1] = str(dataset or REPO / "config/demo/dataset.toml")
        a[a.index("--mixed_precision") + 1] = "no"  # fp32: the two layouts differ only by float summation order
        return ["train", "lora", *a]

    for out, dataset, n in (("one", None, 1), ("two", _batch1(tmp_path), 2)):
        run = _run(args(tmp_path / out, dataset), n)
        assert run.returncode == 0, run.stderr[-3000:]
    a, b = (load_file(str(tmp_path / f"{o}/my_flux_lora-ema.safetensors")) for o in ("one", "two"))
    assert _worst(a, b) < 1e-5
    raw = load_file(str(tmp_path / "one/my_flux_lora.safetensors"))
    assert _worst(a, raw) > 2e-5  # (the EMA is not the last weights: 5e-5 apart after 5 steps at lr 1e-4)
