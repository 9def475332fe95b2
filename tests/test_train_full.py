"""Full fine-tuning on the demo: the reference's README command, the saved DiT, resume after kill -9,
the optimizer modes and the refused inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, scaled
from safetensors import safe_open
from safetensors.torch import load_file

from fluxpipe.cli import main
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

BIN = Path(sys.executable).parent


def full_command(demo: Path, out: Path, *extra: str, flux: str = "flux") -> list[str]:
    """The reference README's full fine-tune settings (Adafactor, fused backward pass, full_bf16), on the demo."""
    return [
        "--pretrained_model_name_or_path",
        str(demo / FILES[flux]),
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
        "ft",
        "--save_model_as",
        "safetensors",
        "--sdpa",
        "--persistent_data_loader_workers",
        "--max_data_loader_n_workers",
        "2",
        "--seed",
        "42",
        "--gradient_checkpointing",
        "--mixed_precision",
        "bf16",
        "--save_precision",
        "bf16",
        "--optimizer_type",
        "adafactor",
        "--optimizer_args",
        "relative_step=False",
        "scale_parameter=False",
        "warmup_init=False",
        "--fused_backward_pass",
        "--full_bf16",
        "--lr_scheduler",
        "constant_with_warmup",
        "--learning_rate",
        "1e-4",
        "--max_grad_norm",
        "0.0",
        "--max_train_epochs",
        "2",
        "--save_every_n_epochs",
        "1",
        "--timestep_sampling",
        "shift",
        "--discrete_flow_shift",
        "3.1582",
        "--model_prediction_type",
        "raw",
        "--guidance_scale",
        "1.0",
        "--cache_latents_to_disk",
        "--cache_text_encoder_outputs",
        "--clip_tokenizer",
        str(demo / CLIP_DIR),
        "--t5_tokenizer",
        str(demo / T5_DIR),
        *extra,
    ]


@pytest.fixture(autouse=True)
def _from_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def forward(flux_file: Path) -> torch.Tensor:
    from fluxpipe.io.checkpoints import load_model

    model = load_model(flux_file, "flux", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, model.params.context_in_dim, generator=g)
    with torch.no_grad():
        return model(
            img=img,
            img_ids=torch.zeros(1, 16, 3),
            txt=txt,
            txt_ids=torch.zeros(1, 8, 3),
            timesteps=torch.tensor([0.5]),
            y=torch.randn(1, model.params.vec_in_dim, generator=g),
            guidance=torch.tensor([1.0]) if model.params.guidance_embed else None,
        )


def test_readme_command_writes_a_strict_loading_dit(demo_dir: Path, tmp_path: Path) -> None:
    assert main(["train", "full", *full_command(demo_dir, tmp_path)]) == 0
    final = tmp_path / "ft.safetensors"
    assert final.is_file() and (tmp_path / "ft-000001.safetensors").is_file()
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
        base = load_file(str(demo_dir / FILES["flux"]))
        assert set(f.keys()) == set(base) and {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert meta["modelspec.architecture"] == "flux-1-dev" and meta["ss_steps"] == "10"
    assert main(["validate", "--flux", str(final)]) == 0
    assert not torch.allclose(forward(final), forward(demo_dir / FILES["flux"]), atol=1e-4)  # it trained
    losses = [
        float(line.split('"loss": ')[1].split(",")[0]) for line in (tmp_path / "ft-loss.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 10 and sum(losses[-3:]) < sum(losses[:3])


def test_samples_and_validation_during_a_full_fine_tune(demo_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube --w 64 --h 64 --s 2 --d 5\n")
    args = full_command(demo_dir, tmp_path / "out", "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1")
    args[args.index("--max_train_epochs") + 1] = "1"
    assert main(["train", "full", *args]) == 0
    assert len(list((tmp_path / "out/sample").glob("ft_e000001_00_*_5.png"))) == 1
    lines = (tmp_path / "out/ft-validation.jsonl").read_text().splitlines()
    assert len(lines) == 2  # before the first step and after the epoch (the demo holds one photo out)


def test_schnell_is_saved_as_schnell(demo_dir: Path, tmp_path: Path) -> None:
    args = full_command(demo_dir, tmp_path, flux="flux_schnell")
    args[args.index("--max_train_epochs") + 1] = "1"
    assert main(["train", "full", *args]) == 0
    with safe_open(str(tmp_path / "ft.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-schnell"  # the reference writes flux-1-dev


def plain_adamw(demo: Path, out: Path, *extra: str) -> list[str]:
    args = full_command(demo, out, *extra)
    for flag in ("--fused_backward_pass", "--full_bf16"):
        args.remove(flag)
    i = args.index("--optimizer_args")
    del args[i : i + 4]
    args[args.index("--optimizer_type") + 1] = "AdamW"
    args[args.index("--mixed_precision") + 1] = "no"
    args[args.index("--save_precision") + 1] = "float"
    args[args.index("--max_train_epochs") + 1] = "1"
    return args


def test_blockwise_optimizers_equal_one_optimizer(demo_dir: Path, tmp_path: Path) -> None:
    results = []
    for name, extra in (("one", ()), ("blockwise", ("--blockwise_fused_optimizers",))):
        assert main(["train", "full", *plain_adamw(demo_dir, tmp_path / name, *extra)]) == 0
        results.append(load_file(str(tmp_path / name / "ft.safetensors")))
    assert all(torch.allclose(results[0][k], results[1][k], rtol=1e-6, atol=1e-7) for k in results[0])


def test_kill_then_resume_equals_an_uninterrupted_run(demo_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        args = full_command(demo_dir, out, "--save_every_n_steps", "3")
        args[args.index("--max_train_epochs") + 1] = "2"
        return [str(BIN / "fluxpipe"), "train", "full", *args, "--auto_resume"]

    clean = subprocess.run(
        command(tmp_path / "clean"), cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(300)
    )
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + scaled(300)
    while proc.poll() is None and time.monotonic() < deadline and not list(killed.glob("*-step00000003-state")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(killed.glob("*-step00000003-state")) and not (killed / "ft.safetensors").exists()
    resumed = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=scaled(300))
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]
    assert "at step 3" in resumed.stderr or "at step 6" in resumed.stderr or "at step 9" in resumed.stderr
    a, b = load_file(str(tmp_path / "clean/ft.safetensors")), load_file(str(killed / "ft.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda a: a.__setitem__(a.index("--optimizer_type") + 1, "AdamW"), "Adafactor"),
        (lambda a: a.extend(["--gradient_accumulation_steps", "2"]), "gradient_accumulation_steps"),
        (lambda a: a.extend(["--blockwise_fused_optimizers"]), "cannot be combined"),
        (lambda a: a.extend(["--fp8_base"]), "not implemented yet in fluxpipe's full fine-tune"),
        (lambda a: a.extend(["--network_dim", "4"]), "not implemented yet in fluxpipe's full fine-tune"),
    ],
)
def test_refused_inputs_are_one_error_line(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], edit, says: str
) -> None:  # noqa: ANN001
    args = full_command(demo_dir, tmp_path)
    edit(args)
    assert main(["train", "full", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
