"""CLIP-L and T5-XXL single-file layouts, and the tokenizers (real files from ../shared when present)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHARED, write_st
from safetensors.torch import load_file

from fluxpipe.errors import CheckpointError, FluxpipeError
from fluxpipe.io.checkpoints import inspect_checkpoint, load_model
from fluxpipe.models.text_encoders import load_clip_tokenizer, load_t5_tokenizer
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

REAL_CLIP = SHARED / "tokenizers" / "clip-vit-large-patch14"
REAL_T5 = SHARED / "tokenizers" / "t5-v1_1-xxl"


def test_clip_file_keys_carry_text_model_prefix_and_load_strictly(demo_dir: Path) -> None:
    state = load_file(str(demo_dir / FILES["clip_l"]))
    assert all(k.startswith("text_model.") for k in state)
    model = load_model(demo_dir / FILES["clip_l"], "clip_l", dtype=torch.float32)
    weight = state["text_model.encoder.layers.1.mlp.fc2.weight"].float()
    assert torch.equal(model.state_dict()["encoder.layers.1.mlp.fc2.weight"], weight)
    assert model.config.hidden_act == "quick_gelu"


def test_clip_extra_projection_keys_are_reported_not_silent(demo_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(demo_dir / FILES["clip_l"])) | {
        "text_projection.weight": torch.zeros(768, 64),
        "logit_scale": torch.zeros(()),
    }
    spec = inspect_checkpoint(write_st(tmp_path / "clip.safetensors", state), "clip_l")
    assert spec.ignored == ("logit_scale", "text_projection.weight")


def test_clip_missing_layer_key_fails(demo_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(demo_dir / FILES["clip_l"]))
    del state["text_model.final_layer_norm.weight"]
    with pytest.raises(CheckpointError, match="missing keys: final_layer_norm.weight"):
        load_model(write_st(tmp_path / "clip.safetensors", state), "clip_l")


def test_clip_pooled_output_is_the_first_end_of_text_state(demo_dir: Path) -> None:
    tok = load_clip_tokenizer(demo_dir / CLIP_DIR)
    model = load_model(demo_dir / FILES["clip_l"], "clip_l", dtype=torch.float32)
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    out = model(ids)
    first_eos = int((ids[0] == tok.eos_token_id).nonzero()[0])
    assert first_eos == 6
    torch.testing.assert_close(out.pooler_output[0], out.last_hidden_state[0, first_eos])


def test_t5_tied_embedding_from_either_name(demo_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(demo_dir / FILES["t5xxl"]))
    for keep in ("shared.weight", "encoder.embed_tokens.weight"):
        drop = "encoder.embed_tokens.weight" if keep == "shared.weight" else "shared.weight"
        one = {k: v for k, v in state.items() if k != drop}
        model = load_model(write_st(tmp_path / f"{keep}.safetensors", one), "t5xxl", dtype=torch.float32)
        assert model.shared.weight is model.encoder.embed_tokens.weight
        assert torch.equal(model.shared.weight, state[keep].float())


def test_t5_fp8_e4m3fn_loads_and_scaled_fp8_is_refused(demo_dir: Path, tmp_path: Path) -> None:
    state = load_file(str(demo_dir / FILES["t5xxl"]))
    fp8 = {k: (v.to(torch.float8_e4m3fn) if "SelfAttention" in k else v) for k, v in state.items()}
    model = load_model(write_st(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", fp8), "t5xxl", dtype=torch.float32)
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.equal(model.state_dict()[q], fp8[q].float())
    scaled = fp8 | {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    with pytest.raises(CheckpointError, match="'scaled' fp8"):
        inspect_checkpoint(write_st(tmp_path / "t5xxl_fp8_scaled.safetensors", scaled), "t5xxl")


def test_t5_output_shape(demo_dir: Path) -> None:
    tok = load_t5_tokenizer(demo_dir / T5_DIR)
    model = load_model(demo_dir / FILES["t5xxl"], "t5xxl", dtype=torch.float32)
    batch = tok(["a photo of a cat"], padding="max_length", max_length=16, return_tensors="pt")
    assert model(batch.input_ids).last_hidden_state.shape == (1, 16, 64)


@pytest.mark.skipif(not REAL_CLIP.is_dir(), reason="../shared/tokenizers not present")
def test_real_clip_tokenizer_ids() -> None:
    tok = load_clip_tokenizer(REAL_CLIP)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77


@pytest.mark.skipif(not REAL_T5.is_dir(), reason="../shared/tokenizers not present")
def test_real_t5_tokenizer_ids() -> None:
    tok = load_t5_tokenizer(REAL_T5)
    assert tok("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert len(tok) == 32100


def test_demo_tokenizers_follow_the_real_conventions(demo_dir: Path) -> None:
    clip = load_clip_tokenizer(demo_dir / CLIP_DIR)
    ids = clip("a photo of a cat").input_ids
    assert ids[0] == len(clip) - 2 and ids[-1] == len(clip) - 1  # <|startoftext|>, <|endoftext|> last in vocab
    t5 = load_t5_tokenizer(demo_dir / T5_DIR)
    assert t5("a cat").input_ids[-1] == 1 and t5.pad_token_id == 0


def test_tokenizer_folder_without_files_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(FluxpipeError, match="lacks vocab.json, merges.txt: point `clip_tokenizer`"):
        load_clip_tokenizer(tmp_path)
    with pytest.raises(FluxpipeError, match="lacks tokenizer.json: point `t5_tokenizer`"):
        load_t5_tokenizer(tmp_path)


def test_no_folder_and_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FluxpipeError, match="HF_HUB_OFFLINE is set.*openai/clip-vit-large-patch14"):
        load_clip_tokenizer(None)
    with pytest.raises(FluxpipeError, match="google/t5-v1_1-xxl"):
        load_t5_tokenizer(None)
