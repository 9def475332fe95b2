"""A T5 LoRA (``--network_args train_t5xxl=True``) with uncached text: lora_te3 modules on T5's attention and MLP
linears, T5 run with gradients each step, the T5 group at the second --text_encoder_lr, the file in the
reference's layout (loadable by the sampler), the state holding it; refused with cached text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_lora_argv
from safetensors import safe_open
from test_uncached_text import _dataset

from fluxpipe.cli import main
from fluxpipe.stages import train_lora
from fluxpipe.training import live_text

torch.set_num_threads(1)
T5_LINEARS = ("SelfAttention_q", "SelfAttention_k", "SelfAttention_v", "SelfAttention_o")
T5_MLP = ("DenseReluDense_wi_0", "DenseReluDense_wi_1", "DenseReluDense_wo")


def _t5_blocks(demo: Path) -> int:
    from fluxpipe.tools.demo import FILES

    with safe_open(str(demo / FILES["t5xxl"]), "pt") as f:
        return 1 + max(int(k.split(".")[2]) for k in f.keys() if k.startswith("encoder.block."))


def _reference_te3_names(blocks: int) -> set[str]:
    """The reference's names: lora_te3_ + the module path (encoder.block.i.layer.j.<child>) with '.' -> '_'."""
    return {f"lora_te3_encoder_block_{i}_layer_0_{n}" for i in range(blocks) for n in T5_LINEARS} | {
        f"lora_te3_encoder_block_{i}_layer_1_{n}" for i in range(blocks) for n in T5_MLP
    }


@pytest.fixture(scope="module")
def t5_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """One 3-step run: lr 1e-3, --text_encoder_lr 2e-4 5e-5 (CLIP-L, T5), --unet_lr 3e-4, CLIP-L trained too,
    gradient checkpointing, a validation image and a sample prompt."""
    tmp = tmp_path_factory.mktemp("t5lora")
    toml = _dataset(tmp, "")
    groups: list[dict] = []
    real, encode = train_lora.build_optimizer, live_text.TextEncoders.encode_t5

    def spy(kind: str, param_groups: list[dict], *rest: object) -> object:
        groups.extend({"description": g["description"], "lr": g["lr"], "n": len(g["params"])} for g in param_groups)
        return real(kind, param_groups, *rest)  # type: ignore[arg-type]

    def t5_spy(self: live_text.TextEncoders, captions: list[str], *rest: object) -> dict:
        calls.append((list(captions), torch.is_grad_enabled()))
        checkpointing.append(self.t5.training and getattr(self.t5.encoder, "gradient_checkpointing", False))
        return encode(self, captions, *rest)  # type: ignore[arg-type]

    calls: list[tuple[list[str], bool]] = []
    checkpointing: list[bool] = []
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red cube --w 64 --h 64 --s 1 --d 5\n")
    flags = ("--network_args", "train_t5xxl=True", "--learning_rate", "1e-3", "--unet_lr", "3e-4", "--save_state")
    flags += ("--gradient_checkpointing",)  # T5 checkpointed too, as in the reference: the gradients still arrive
    monitor = ("--validation_split", "0.34", "--validate_every_n_steps", "3", "--sample_prompts", str(prompts))
    argv = tiny_lora_argv(demo_dir, toml, tmp / "out", 3, *flags, "--text_encoder_lr", "2e-4", "5e-5", *monitor)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lora, "build_optimizer", spy)
        mp.setattr(live_text.TextEncoders, "encode_t5", t5_spy)
        assert main([*argv, "--sample_every_n_steps", "3"]) == 0
    assert checkpointing and all(checkpointing)
    return tmp / "out", groups, calls


def test_file_holds_the_reference_te3_names_and_every_part_trained(demo_dir: Path, t5_run: tuple) -> None:
    out, *_ = t5_run
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    te3 = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in sd if "lora_te3" in k}
    assert te3 == _reference_te3_names(_t5_blocks(demo_dir))
    for name in te3:  # rank 4, alpha 1 (--network_alpha's default)
        assert sd[f"{name}.lora_down.weight"].shape[0] == 4 and float(sd[f"{name}.alpha"]) == 1.0
    # lora_up starts at zero: after 3 steps the T5 LoRA, the CLIP-L LoRA and the DiT LoRA all moved
    for prefix in ("lora_te3_", "lora_te1_", "lora_unet_"):
        ups = [v for k, v in sd.items() if k.startswith(prefix) and k.endswith("lora_up.weight")]
        assert ups and all(float(u.abs().sum()) > 0 for u in ups), prefix
    assert json.loads(meta["ss_network_args"]) == {"train_t5xxl": "True", "dropout": None}
    assert meta["ss_text_encoder_lr"] == "[0.0002, 5e-05]"


def test_t5_group_gets_the_second_text_encoder_lr(t5_run: tuple, demo_dir: Path) -> None:
    _, groups, _ = t5_run
    lrs = {g["description"]: g["lr"] for g in groups}
    assert lrs == {"textencoder 1": 2e-4, "textencoder 2": 5e-5, "unet": 3e-4}
    n_te3 = len(_reference_te3_names(_t5_blocks(demo_dir)))
    assert next(g["n"] for g in groups if g["description"] == "textencoder 2") == 2 * n_te3  # down + up


def test_state_holds_the_t5_lora(t5_run: tuple) -> None:
    from fluxpipe.training.state import load_state

    out, *_ = t5_run
    state = load_state(out / "lora-state")
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        for k in (k for k in f.keys() if k.startswith("lora_te3_")):
            assert torch.equal(state.weights[k].float(), f.get_tensor(k).float()), k


def test_sampler_merges_the_t5_lora(demo_dir: Path, t5_run: tuple) -> None:
    from fluxpipe.inference.sampler import split_lora
    from fluxpipe.io.checkpoints import load_model
    from fluxpipe.lora.files import apply_lora, load_lora_file
    from fluxpipe.tools.demo import FILES

    out, *_ = t5_run
    parts = split_lora(load_lora_file(out / "lora.safetensors"))
    t5 = load_model(demo_dir / FILES["t5xxl"], "t5xxl", dtype=torch.float32, device="cpu")
    ids = torch.tensor([[5, 9, 3, 1]])
    with torch.no_grad():
        before = t5(ids).last_hidden_state
        merged = apply_lora(torch.nn.Identity(), parts["lora_te3"], 1.0, t5xxl=t5)
        after = t5(ids).last_hidden_state
    assert merged == len(_reference_te3_names(_t5_blocks(demo_dir)))
    assert not torch.allclose(before, after)


def test_train_t5xxl_with_network_train_unet_only_is_one_line_exit_2(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = _dataset(tmp_path, "")
    argv = tiny_lora_argv(
        demo_dir, toml, tmp_path / "out", 1, "--network_train_unet_only", "--network_args", "train_t5xxl=True"
    )
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fluxpipe: error:") and "network_train_unet_only" in err[0]


def test_t5_runs_with_grad_in_each_step_and_through_the_lora_for_validation_and_samples(t5_run: tuple) -> None:
    out, _, calls = t5_run
    train = [c for c, grad in calls if grad]
    assert len(train) == 3 and all(len(c) == 2 for c in train)  # 2 training images: one batch of 2 per step
    frozen = [c for c, grad in calls if not grad]
    assert ["a red cube"] in frozen  # the sample prompt, encoded by the current T5 LoRA (at step 3)
    assert [c for c in frozen if c != ["a red cube"]]  # the validation image's caption (at step 3)
    assert (out / "lora-validation.jsonl").is_file() and list((out / "sample").glob("*.png"))
