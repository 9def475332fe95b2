"""LoRA training from the reference's command line on the demo: the file, the loss, exact resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, scaled
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from fluxpipe.cli import main
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

BIN = Path(sys.executable).parent


def seed_command(demo: Path, out: Path, *extra: str) -> list[str]:
    """The seed's command (paths pointed at the demo models and dataset), shortened to a few epochs."""
    return [
        "--pretrained_model_name_or_path",
        str(demo / FILES["flux"]),
        "--clip_l",
        str(demo / FILES["clip_l"]),
        "--t5xxl",
        str(demo / FILES["t5xxl"]),
        "--ae",
        str(demo / FILES["ae"]),
        "--dataset_config",
        str(REPO / "config/demo/dataset.toml"),
        "--output_dir",
        str(out),
        "--output_name",
        "my_flux_lora",
        "--save_model_as",
        "safetensors",
        "--network_module",
        "networks.lora_flux",
        "--network_dim",
        "16",
        "--network_alpha",
        "1",
        "--learning_rate",
        "1e-4",
        "--optimizer_type",
        "AdamW8bit",
        "--lr_scheduler",
        "constant",
        "--sdpa",
        "--max_train_epochs",
        "2",
        "--save_every_n_epochs",
        "1",
        "--mixed_precision",
        "fp16",
        "--gradient_checkpointing",
        "--guidance_scale",
        "1.0",
        "--timestep_sampling",
        "flux_shift",
        "--model_prediction_type",
        "raw",
        "--blocks_to_swap",
        "18",
        "--cache_text_encoder_outputs",
        "--cache_latents",
        "--clip_tokenizer",
        str(demo / CLIP_DIR),
        "--t5_tokenizer",
        str(demo / T5_DIR),
        *extra,
    ]


@pytest.fixture(autouse=True)
def _from_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the demo dataset TOML names its images relative to the repository


def test_seed_command_writes_a_kohya_lora(demo_dir: Path, tmp_path: Path) -> None:
    assert main(["train", "lora", *seed_command(demo_dir, tmp_path)]) == 0
    final = tmp_path / "my_flux_lora.safetensors"
    assert (tmp_path / "my_flux_lora-000001.safetensors").is_file() and final.is_file()
    state = load_file(str(final))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    unet = {n for n in names if n.startswith("lora_unet_")}
    te1 = {n for n in names if n.startswith("lora_te1_text_model_encoder_layers_")}
    assert len(unet) == 26 and len(te1) == 12 and names == unet | te1  # 2x10 double + 2x3 single; 2 CLIP layers x 6
    assert state["lora_te1_text_model_encoder_layers_1_mlp_fc1.lora_up.weight"].abs().sum() > 0  # CLIP LoRA trained
    down = state["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    assert down.shape == (16, 64) and state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (192, 16)
    assert float(state["lora_unet_single_blocks_1_linear2.alpha"]) == 1.0
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_network_dim"] == "16"
    assert (
        meta["ss_network_module"] == "networks.lora_flux" and meta["ss_steps"] == "10"
    )  # 5 training images x 2 repeats / 2 x 2 epochs
    assert meta["ss_network_train_unet_only"] == "False"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8


def test_fp8_base_trains(demo_dir: Path, tmp_path: Path) -> None:
    args = seed_command(demo_dir, tmp_path, "--network_train_unet_only", "--fp8_base")
    args[args.index("--max_train_epochs") + 1] = "1"
    assert main(["train", "lora", *args]) == 0
    with safe_open(str(tmp_path / "my_flux_lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_fp8_base"] == "True"
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


def test_epoch_ratio_full_bf16_and_tensorboard(demo_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = seed_command(
        demo_dir,
        tmp_path,
        "--network_train_unet_only",
        "--save_n_epoch_ratio",
        "2",
        "--full_bf16",
        "--logging_dir",
        str(tmp_path / "logs"),
        "--log_prefix",
        "demo_",
    )
    args[args.index("--max_train_epochs") + 1] = "4"
    args[args.index("--mixed_precision") + 1] = "bf16"
    args[args.index("--save_every_n_epochs") + 1] = "1"  # overridden: 4 epochs // ratio 2 -> every 2nd epoch
    assert main(["train", "lora", *args]) == 0
    assert sorted(p.name for p in tmp_path.glob("my_flux_lora*.safetensors")) == [
        "my_flux_lora-000002.safetensors",
        "my_flux_lora.safetensors",
    ]
    with safe_open(str(tmp_path / "my_flux_lora.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # the LoRA itself was bf16
    (run,) = (tmp_path / "logs").iterdir()
    assert run.name.startswith("demo_") and len(run.name) == len("demo_") + 14
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/current", "loss/average", "loss/epoch_average", "lr/unet"} <= tags
    assert [e.step for e in events.Scalars("loss/current")] == list(range(1, 21))  # 5 batches x 4 epochs
    assert [e.step for e in events.Scalars("loss/epoch_average")] == [1, 2, 3, 4]


def test_cpu_offload_checkpointing_trains_the_same_lora(demo_dir: Path, tmp_path: Path) -> None:
    results = []
    for name, extra in (("plain", ()), ("offload", ("--cpu_offload_checkpointing",))):
        args = seed_command(
            demo_dir,
            tmp_path / name,
            "--network_train_unet_only",
            "--blocks_to_swap",
            "0",
            "--network_dropout",
            "0.1",
            *extra,
        )
        args[args.index("--max_train_epochs") + 1] = "1"
        assert main(["train", "lora", *args]) == 0
        results.append(load_file(str(tmp_path / name / "my_flux_lora.safetensors")))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(v.abs().sum() > 0 for k, v in results[0].items() if "lora_up" in k)


def test_samples_and_validation_leave_the_training_unchanged(demo_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red cube --w 64 --h 64 --s 2 --d 5\na blue sphere --w 96 --h 64 --s 2\n")
    runs = {}
    for name, extra in (
        ("plain", ()),
        ("sampled", ("--sample_prompts", str(prompts), "--sample_every_n_steps", "3", "--sample_at_first")),
    ):
        args = seed_command(demo_dir, tmp_path / name, "--network_dropout", "0.1", *extra)
        assert main(["train", "lora", *args]) == 0
        runs[name] = load_file(str(tmp_path / name / "my_flux_lora.safetensors"))
        lines = (tmp_path / name / "my_flux_lora-validation.jsonl").read_text().splitlines()
        runs[name + "-validation"] = [json.loads(line) for line in lines]
    assert all(torch.equal(runs["plain"][k], runs["sampled"][k]) for k in runs["plain"])  # RNG streams untouched
    assert runs["plain-validation"] == runs["sampled-validation"]
    assert [r["epoch"] for r in runs["plain-validation"]] == [0, 1, 2]  # before training, then each epoch
    assert set(runs["plain-validation"][0]["by_sigma"]) == {"0.2", "0.4", "0.6", "0.8"}
    samples = sorted(p.name.split("_")[3] + "_" + p.name.split("_")[4] for p in (tmp_path / "sampled/sample").iterdir())
    # steps 0 (at first), 3, 6, 9 of 10; prompt 0 has its own seed 5, prompt 1 gets seed 42 + 1
    assert len(samples) == 8 and {s.split("_")[0] for s in samples} == {"e000000", "000003", "000006", "000009"}
    with Image.open(next((tmp_path / "sampled/sample").glob("*_01_*_43.png"))) as image:
        assert image.size == (96, 64)


def test_sample_triggers_need_a_prompt_file(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "lora", *seed_command(demo_dir, tmp_path, "--sample_every_n_epochs", "1")]) == 2
    assert "need --sample_prompts FILE" in capsys.readouterr().err


def test_addnet_hashes_by_hand() -> None:
    import hashlib
    import struct

    from safetensors.torch import save

    from fluxpipe.lora.files import addnet_hashes

    tensors = {"a.lora_down.weight": torch.arange(300_000, dtype=torch.float32).reshape(3000, 100)}
    meta = {"ss_network_dim": "4", "modelspec.title": "x"}
    blob = save(tensors, {"ss_network_dim": "4"})  # only ss_* metadata takes part
    n = struct.unpack("<Q", blob[:8])[0]
    assert addnet_hashes(tensors, meta) == {
        "sshs_model_hash": hashlib.sha256(blob[8 + n :]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[1 << 20 : (1 << 20) + 65536]).hexdigest()[:8],
    }


def test_save_last_n_epochs_keeps_the_newest(demo_dir: Path, tmp_path: Path) -> None:
    args = seed_command(demo_dir, tmp_path, "--network_train_unet_only", "--save_last_n_epochs", "2", "--save_state")
    args[args.index("--max_train_epochs") + 1] = "5"
    assert main(["train", "lora", *args]) == 0
    files = sorted(p.name for p in tmp_path.glob("my_flux_lora-0*"))
    assert files == [
        "my_flux_lora-000003-state",
        "my_flux_lora-000003.safetensors",
        "my_flux_lora-000004-state",
        "my_flux_lora-000004.safetensors",
    ]


def fixed_noise_loss(demo: Path, cache: Path, lora: Path | None) -> float:
    """Loss of the demo DiT (with the LoRA merged) on fixed timesteps and noise over the demo data."""
    from fluxpipe.data.batches import CachedTensors, epoch_batches, load_items, make_batch
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.lora.files import apply_lora
    from fluxpipe.training.loss import FlowSettings, flow_loss

    idx = (cache / "cache/latents/index.parquet", cache / "cache/text/index.parquet")
    items = load_items(cache / "dataset/manifest.parquet", *idx)
    tensors = CachedTensors(*idx)
    dit = load_model(demo / FILES["flux"], "flux", dtype=torch.float32).eval()
    if lora is not None:
        apply_lora(dit, load_file(str(lora)), 1.0)
    gen, total = torch.Generator().manual_seed(0), 0.0
    with torch.no_grad():
        for epoch in range(3):
            for batch in epoch_batches(items, {0: 2}, epoch, 0):
                total += float(
                    flow_loss(dit, make_batch(items, batch, tensors, gen, "cpu", torch.float32), FlowSettings(), gen)
                )
    return total


def test_training_lowers_the_loss(demo_dir: Path, tmp_path: Path) -> None:
    args = seed_command(demo_dir, tmp_path, "--network_train_unet_only")
    args[args.index("--network_alpha") + 1] = "16"
    args[args.index("--learning_rate") + 1] = "1e-3"
    args[args.index("--max_train_epochs") + 1] = "12"
    assert main(["train", "lora", *args]) == 0
    cache = tmp_path / ".fluxpipe-cache"
    before = fixed_noise_loss(demo_dir, cache, None)
    after = fixed_noise_loss(demo_dir, cache, tmp_path / "my_flux_lora.safetensors")
    assert after < 0.9 * before, (before, after)


def test_kill_mid_epoch_then_resume_equals_an_uninterrupted_run(demo_dir: Path, tmp_path: Path) -> None:
    extra = ("--save_every_n_steps", "4", "--network_train_unet_only", "--optimizer_type", "AdamW")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        args = seed_command(demo_dir, out, *extra)
        args[args.index("--max_train_epochs") + 1] = "3"
        args[args.index("--optimizer_type") + 1] = "AdamW"  # the later flag wins either way; keep one
        return [str(BIN / "fluxpipe"), "train", "lora", *args, "--auto_resume"]

    clean = subprocess.run(
        command(tmp_path / "clean"), cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(300)
    )
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + scaled(300)
    while proc.poll() is None and time.monotonic() < deadline and not list(killed.glob("*-step00000004-state")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(killed.glob("*-step00000004-state")) and not (killed / "my_flux_lora.safetensors").exists()
    resumed = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(300))
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    a, b = (
        load_file(str(tmp_path / "clean/my_flux_lora.safetensors")),
        load_file(str(killed / "my_flux_lora.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("flag", "says"),
    [
        (["--v2"], "SD-only"),
        (["--clip_skip", "2"], "SD-only"),
        (["--max_token_length", "225"], "t5xxl_max_token_length"),
        (["--bogus_flag"], "bogus_flag"),
        (["--full_fp16"], "not implemented yet"),
        (["--log_with", "wandb"], "TensorBoard only"),
        (["--log_with", "tensorboard"], "needs --logging_dir"),
        (["--cpu_offload_checkpointing"], "cannot be combined"),
        (["--scale_weight_norms", "1.0"], "not implemented yet"),
    ],
)
def test_rejected_flags_are_one_error_line(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: list[str], says: str
) -> None:
    assert main(["train", "lora", *seed_command(demo_dir, tmp_path), *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


@pytest.mark.gpu
def test_gpu_fp16_training_scales_the_loss(demo_dir: Path, tmp_path: Path) -> None:
    from fluxpipe.training.state import load_state

    args = seed_command(demo_dir, tmp_path, "--network_train_unet_only", "--save_state", "--blocks_to_swap", "0")
    args[args.index("--max_train_epochs") + 1] = "1"
    assert main(["train", "lora", *args]) == 0  # the seed's --mixed_precision fp16, on the GPU
    state = load_state(tmp_path / "my_flux_lora-state")
    assert state.extra["grad_scaler"]["scale"] > 0  # the GradScaler ran and its state is saved for resume
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "my_flux_lora.safetensors")).values())


def test_rerun_from_the_final_state_keeps_ss_epoch_and_removes_a_killed_run_s_temporaries(
    demo_dir: Path, tmp_path: Path
) -> None:
    from test_atomic import dead_pid

    from fluxpipe.io.atomic import HOST

    args = seed_command(
        demo_dir, tmp_path, "--network_train_unet_only", "--optimizer_type", "AdamW", "--save_state", "--auto_resume"
    )
    args[args.index("--max_train_epochs") + 1] = "4"
    args[args.index("--save_every_n_epochs") + 1] = "4"
    assert main(["train", "lora", *args]) == 0
    pid = dead_pid()  # a killed run's leftovers: a step file's temporary and a state's temporary folder
    orphans = [
        tmp_path / f".my_flux_lora-step00000003.safetensors.{HOST}-{pid}.x1y2z3w4.tmp",
        tmp_path / f".my_flux_lora-000002-state.{HOST}-{pid}.{'e5' * 16}.tmp",
    ]
    orphans[0].write_text("partial")
    orphans[1].mkdir()
    unrelated = [tmp_path / ".my_flux_lora.notes", tmp_path / f".other.safetensors.{HOST}-{pid}.x1y2z3w4.tmp"]
    for p in unrelated:
        p.write_text("keep")
    assert main(["train", "lora", *args]) == 0  # resumes from the final state: nothing left to train
    with safe_open(str(tmp_path / "my_flux_lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_epoch"] == "4" and meta["ss_steps"] == "20"  # 5 images x 2 repeats / batch 2 x 4 epochs
    assert not any(p.exists() for p in orphans) and all(p.exists() for p in unrelated)


def test_log_step_stops_on_a_nonfinite_loss() -> None:
    from tqdm import tqdm

    from fluxpipe.errors import FluxpipeError
    from fluxpipe.training.saving import log_step
    from fluxpipe.training.log import TrainLogger

    records: list[dict] = []
    logger, bar = TrainLogger(None), tqdm(total=3, disable=True)
    log_step(records, logger, bar, 1, 0, 0.25, {"unet": 1e-4})
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(FluxpipeError, match=rf"^step 2: the loss is {bad}; training stopped"):
            log_step(records, logger, bar, 2, 0, bad, {"unet": 1e-4})
    assert records == [{"step": 1, "epoch": 0, "loss": 0.25, "lr": 1e-4}]


def test_nan_loss_stops_with_one_line_and_keeps_the_last_saved_state(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fluxpipe.stages.train_lora as train_lora
    from fluxpipe.training.state import load_state

    real, calls = train_lora.flow_loss, []

    def diverging(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(train_lora, "flow_loss", diverging)
    args = seed_command(
        demo_dir,
        tmp_path,
        "--network_train_unet_only",
        "--save_state",
        "--save_every_n_steps",
        "2",
        "--blocks_to_swap",
        "0",
        "--optimizer_type",
        "AdamW",
        "--mixed_precision",
        "no",
    )
    assert main(["train", "lora", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert len(err) == 1 and err[0].startswith("fluxpipe: error: step 4: the loss is nan; training stopped"), err
    state = load_state(tmp_path / "my_flux_lora-step00000002-state")
    assert state.step == 2 and all(torch.isfinite(v).all() for v in state.weights.values())
    assert not (tmp_path / "my_flux_lora.safetensors").exists()
    assert not list(tmp_path.glob("*step00000004*"))
    lines = (tmp_path / "my_flux_lora-loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # strict JSON: bare NaN would fail below
    assert all("NaN" not in line for line in lines)
