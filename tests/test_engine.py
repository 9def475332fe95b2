"""The shared training engine (fluxpipe.training.engine): fp16 loss scaling in every method, the LoRA's run
figures and dataset metadata, ControlNet samples and validation, and the loss log's resource fields."""

from __future__ import annotations

import json
import resource
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_train_controlnet import cn_command
from test_train_full import full_command
from test_train_lora import seed_command

from fluxpipe.cli import main
from fluxpipe.training import engine

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _from_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def test_only_fp16_on_a_gpu_scales_the_loss() -> None:
    assert engine.scales_loss(torch.float16, "cuda")
    assert engine.scales_loss(torch.float16, "cuda:1")
    assert not engine.scales_loss(torch.bfloat16, "cuda")
    assert not engine.scales_loss(torch.float32, "cuda")
    assert not engine.scales_loss(torch.float16, "cpu")


class CountingScaler(torch.amp.GradScaler):
    """A real (CPU) loss scaler that counts what the loop asks of it."""

    def __init__(self) -> None:
        super().__init__("cpu", enabled=True, init_scale=1024.0)
        self.calls: Counter[str] = Counter()

    def scale(self, outputs):  # noqa: ANN001, ANN201
        self.calls["scale"] += 1
        return super().scale(outputs)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        self.calls["unscale_"] += 1
        super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        self.calls["step"] += 1
        return super().step(optimizer, *args, **kwargs)


def non_fused_full(demo: Path, out: Path) -> list[str]:
    """The full fine-tune without the fused modes (they step inside backward) and without --full_bf16."""
    return [a for a in full_command(demo, out) if a not in ("--fused_backward_pass", "--full_bf16")]


@pytest.mark.parametrize("method", ["lora", "full", "controlnet"])
def test_every_method_steps_through_the_loss_scaler(
    method: str, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[CountingScaler] = []

    def scaler(dtype: torch.dtype, device: str) -> CountingScaler:
        made.append(CountingScaler())
        return made[-1]

    monkeypatch.setattr(engine, "grad_scaler", scaler)
    args = {
        "lora": lambda: seed_command(demo_dir, tmp_path, "--network_train_unet_only", "--blocks_to_swap", "0"),
        "full": lambda: non_fused_full(demo_dir, tmp_path),
        "controlnet": lambda: cn_command(demo_dir, tmp_path),
    }[method]()
    args[args.index("--max_train_epochs") + 1] = "1"
    args[args.index("--mixed_precision") + 1] = "fp16"
    assert main(["train", method, *args]) == 0
    assert len(made) == 1
    calls = made[0].calls
    assert calls["scale"] == 5 and calls["unscale_"] == 5 and calls["step"] == 5  # 5 batches of 2, 5 steps


def test_the_lora_metadata_carries_the_runs_figures_and_dataset(demo_dir: Path, tmp_path: Path) -> None:
    from fluxpipe.io.tables import read_parquet

    args = seed_command(demo_dir, tmp_path, "--network_train_unet_only", "--max_train_steps", "1600")
    assert main(["train", "lora", *args]) == 0
    with safe_open(str(tmp_path / "my_flux_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    # 5 training photos x 2 repeats in batches of 2: 5 batches an epoch, 2 epochs (--max_train_epochs wins)
    assert meta["ss_steps"] == "10" and meta["ss_max_train_steps"] == "10"
    assert meta["ss_num_batches_per_epoch"] == "5" and meta["ss_num_epochs"] == "2" and meta["ss_epoch"] == "2"
    datasets = json.loads(meta["ss_datasets"])
    assert len(datasets) == 1
    ds = datasets[0]
    assert ds["is_dreambooth"] is True and ds["batch_size_per_device"] == 2
    assert ds["num_train_images"] == 10 and ds["num_reg_images"] == 0
    assert ds["resolution"] == [256, 256] and ds["enable_bucket"] is True
    assert ds["min_bucket_reso"] == 128 and ds["max_bucket_reso"] == 512
    assert sum(b["count"] for b in ds["bucket_info"]["buckets"].values()) == 10
    (sub,) = ds["subsets"]
    assert sub["img_count"] == 5 and sub["num_repeats"] == 2 and sub["image_dir"] == "images"
    assert json.loads(meta["ss_dataset_dirs"]) == {"images": {"n_repeats": 2, "img_count": 5}}
    table, _ = read_parquet(tmp_path / ".fluxpipe-cache/dataset/manifest.parquet")
    captions = list(table[table.split == "train"].caption)
    expected: dict[str, int] = {}
    for c in captions:  # e.g. "a cup of coffee on a wooden table, seen from above": two tags
        for tag in c.split(","):
            expected[tag.strip().lower()] = expected.get(tag.strip().lower(), 0) + 1
    assert json.loads(meta["ss_tag_frequency"]) == {"images": expected}
    assert ds["tag_frequency"] == {"images": expected}


def test_loss_records_carry_elapsed_seconds_and_peak_memory(demo_dir: Path, tmp_path: Path) -> None:
    args = seed_command(demo_dir, tmp_path, "--network_train_unet_only", "--blocks_to_swap", "0")
    assert main(["train", "lora", *args]) == 0
    records = [json.loads(x) for x in (tmp_path / "my_flux_lora-loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))
    assert all(set(r) == {"step", "epoch", "loss", "lr", "elapsed_s", "peak_memory_mb"} for r in records)
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed[0] >= 0 and elapsed == sorted(elapsed)
    peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (ru_maxrss in KiB on Linux)
    assert all(0 < r["peak_memory_mb"] <= peak_now + 1 for r in records)
    assert records[-1]["peak_memory_mb"] > 50  # torch alone is more


def test_controlnet_training_samples_and_validates(demo_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    hint = REPO / "config/demo/conditioning" / sorted(p.name for p in (REPO / "config/demo/conditioning").iterdir())[0]
    prompts.write_text(f"a cat --w 64 --h 64 --s 2 --d 7 --cn {hint}\n")
    args = cn_command(demo_dir, tmp_path / "out", "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1")
    assert main(["train", "controlnet", *args]) == 0
    samples = sorted(p.name for p in (tmp_path / "out/sample").glob("*.png"))
    assert len(samples) == 2 and samples[0].startswith("cn_e000001_00_") and samples[1].startswith("cn_e000002_00_")
    lines = (tmp_path / "out/cn-validation.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [r["epoch"] for r in records] == [0, 1, 2] and all(r["items"] == 1 for r in records)
    assert records[0]["loss"] > 0 and records[0]["loss"] != records[-1]["loss"]  # the ControlNet learned


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "full", "controlnet"])
def test_fp16_on_a_gpu_trains_with_a_scaled_loss(method: str, demo_dir: Path, tmp_path: Path) -> None:
    from fluxpipe.training.state import load_state

    args = {
        "lora": lambda: seed_command(demo_dir, tmp_path, "--network_train_unet_only", "--blocks_to_swap", "0"),
        "full": lambda: non_fused_full(demo_dir, tmp_path),
        "controlnet": lambda: cn_command(demo_dir, tmp_path),
    }[method]()
    args[args.index("--mixed_precision") + 1] = "fp16"
    assert main(["train", method, *args, "--save_state"]) == 0
    name = {"lora": "my_flux_lora", "full": "ft", "controlnet": "cn"}[method]
    state = load_state(tmp_path / f"{name}-state")
    scale = state.extra["grad_scaler"]
    assert scale is not None and 0 < scale["scale"] <= 65536.0  # the scaler ran (and backed off at most)
    losses = [json.loads(x)["loss"] for x in (tmp_path / f"{name}-loss.jsonl").read_text().splitlines()]
    assert len(losses) == 10 and all(0 < v < 10 for v in losses)
    assert any(v.abs().sum() > 0 for v in state.weights.values())
