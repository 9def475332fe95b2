"""Chroma in the Snakemake pipeline (train.model_type: chroma): what config.yaml turns into for the rules, its
refusals (one line, exit 2), the caches keyed apart from FLUX's, and the demo run that ends with a Chroma LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from fluxpipe import workflow as fw
from fluxpipe.cli import main
from fluxpipe.config.pipeline import load_pipeline
from fluxpipe.config.typed import ConfigError
from fluxpipe.tools.demo import CHROMA_FILE, FILES, T5_DIR, write_chroma_demo

torch.set_num_threads(1)

CHROMA_TRAIN = {
    "network_module": "networks.lora_flux",
    "model_type": "chroma",
    "guidance_scale": 0,
    "apply_t5_attn_mask": True,
    "output_name": "c",
}
CHROMA_CACHE = {"apply_t5_attn_mask": True}


def chroma_config(**changes: object) -> dict:
    """A Chroma pipeline on the demo models (changes: top-level settings replaced)."""
    return {"train": dict(CHROMA_TRAIN), "cache": dict(CHROMA_CACHE), **changes}


def test_chroma_on_the_demo_reaches_every_rule() -> None:
    cfg = load_pipeline(chroma_config())
    files = {"flux": "results/demo_models/chroma-tiny.safetensors", "ae": fw.DEMO_FILES["ae"]}
    files["t5xxl"] = fw.DEMO_FILES["t5xxl"]
    assert cfg.chroma and fw.model_files(cfg) == files  # no clip_l
    assert fw.validate_inputs(cfg) == {**files, "t5_vocab": f"{fw.DEMO_FILES['t5_tokenizer']}/tokenizer.json"}
    assert fw.validate_files_argv(cfg) == ["--flux", files["flux"], "--ae", files["ae"], "--t5xxl", files["t5xxl"]]
    assert fw.validate_args(cfg) == ["--model-type", "chroma", "--t5-tokenizer", fw.DEMO_FILES["t5_tokenizer"]]
    argv = fw.training_argv(cfg, "lora")
    assert argv == [
        "--pretrained_model_name_or_path",
        files["flux"],
        "--t5xxl",
        files["t5xxl"],
        "--ae",
        files["ae"],
        "--dataset_config",
        "",
        "--output_dir",
        "results/train/lora",
        "--network_module",
        "networks.lora_flux",
        "--model_type",
        "chroma",
        "--guidance_scale",
        "0",
        "--apply_t5_attn_mask",
        "--output_name",
        "c",
        "--t5_tokenizer",
        fw.DEMO_FILES["t5_tokenizer"],
    ]


def test_chroma_with_its_own_files() -> None:
    models = {"flux": "Chroma1-Base.safetensors", "ae": "ae.safetensors", "t5xxl": "t5.safetensors"}
    cfg = load_pipeline(chroma_config(models={**models, "clip_tokenizer": "tok/clip"}))
    assert fw.model_files(cfg) == models and fw.tokenizer_dirs(cfg) == {"clip_tokenizer": None, "t5_tokenizer": None}
    assert fw.validate_args(cfg) == ["--model-type", "chroma"]  # (no CLIP tokenizer: Chroma has no CLIP-L)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            chroma_config(models={"flux": "c", "ae": "a", "clip_l": "l", "t5xxl": "t"}),
            "models.clip_l: l: Chroma (train.model_type: chroma) uses no CLIP-L text encoder; leave models.clip_l empty",
        ),
        (
            chroma_config(models={"flux": "c", "t5xxl": "t"}),
            "models: set the Chroma DiT (models.flux), ae and t5xxl or none (none = demo models); missing: models.ae",
        ),
        (
            {"models": {"flux": "f", "ae": "a", "t5xxl": "t"}},
            "models: set all four model files or none (none = demo models); missing: models.clip_l",
        ),
        (
            chroma_config(train_full={"output_name": "x"}, train_controlnet={"output_name": "y"}),
            "train_full, train_controlnet: train.model_type chroma: only LoRA training supports Chroma; leave "
            "train_full and train_controlnet empty (`train_full:` with no value)",
        ),
        (
            chroma_config(cache={"apply_t5_attn_mask": False}),
            "cache.apply_t5_attn_mask: false, but Chroma (train.model_type: chroma) needs the T5 attention mask in "
            "the text cache: set cache.apply_t5_attn_mask: true",
        ),
        (
            chroma_config(train={**CHROMA_TRAIN, "guidance_scale": 1.0}),
            "train: --model_type chroma: --guidance_scale 1.0: Chroma trains with 0; pass --guidance_scale 0",
        ),
        (
            chroma_config(train={**CHROMA_TRAIN, "apply_t5_attn_mask": False}),
            "train: --model_type chroma: Chroma needs the T5 attention mask: add --apply_t5_attn_mask",
        ),
        (  # the standalone rule: `fluxpipe train full --model_type chroma` is refused the same way
            {"train_full": {"model_type": "chroma", "guidance_scale": 0, "apply_t5_attn_mask": True}},
            "train_full: --model_type chroma: only LoRA training supports Chroma (not `train full`); use "
            "`fluxpipe train lora`",
        ),
        (
            {"train_controlnet": {"model_type": "chroma", "guidance_scale": 0, "apply_t5_attn_mask": True}},
            "train_controlnet: --model_type chroma: only LoRA training supports Chroma (not `train controlnet`); "
            "use `fluxpipe train lora`",
        ),
    ],
)
def test_chroma_config_refusals(config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_pipeline(config)
    assert str(e.value) == message


def test_a_refused_config_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """What the Snakefile does with a bad config.yaml (rules/common.smk: fw.load_or_exit)."""
    with pytest.raises(SystemExit) as e:
        fw.load_or_exit(chroma_config(train_full={"output_name": "x"}))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "fluxpipe: error: train_full: train.model_type chroma: only LoRA training supports Chroma; leave "
        "train_full empty (`train_full:` with no value)"
    ]


def test_text_cache_of_flux_and_chroma_are_keyed_apart(tmp_path: Path) -> None:
    """The text shards' settings digest names the files each uses: Chroma's DiT, no CLIP-L; a FLUX report with
    the same T5 gives another digest, so a FLUX text cache is never taken for a Chroma one (or the reverse)."""
    entry = {"sha256": "t5sha", "path": "t"}
    tok = {"t5_tokenizer": {"sha256": "toksha"}}
    chroma_report, flux_report = tmp_path / "chroma.json", tmp_path / "flux.json"
    chroma_report.write_text(json.dumps({"models": {"chroma": {"sha256": "csha"}, "t5xxl": entry}, "tokenizers": tok}))
    models = {"flux": {"sha256": "fsha"}, "clip_l": {"sha256": "lsha"}, "t5xxl": entry}
    flux_report.write_text(json.dumps({"models": models, "tokenizers": tok}))
    chroma, flux = load_pipeline(chroma_config()), load_pipeline({"cache": dict(CHROMA_CACHE)})
    common = {"len": None, "mask": True, "dtype": "bfloat16", "device": "auto", "format": fw.CACHE_FORMAT["text"]}
    assert fw.text_params(chroma, str(chroma_report)) == fw.settings_digest(
        {"t5xxl": "t5sha", "chroma": "csha", "clip_tokenizer": "hub", "t5_tokenizer": "toksha", **common}
    )
    flux_settings = {"clip_l": "lsha", "t5xxl": "t5sha", "flux": "fsha", "clip_tokenizer": "hub"}
    assert fw.text_params(flux, str(flux_report)) == fw.settings_digest(
        {**flux_settings, "t5_tokenizer": "toksha", **common}
    )
    # and each cache entry's key: no CLIP-L file, no CLIP tokenizer (cache_text.text_identity)
    from fluxpipe.stages.cache_text import CacheTextConfig, text_identity

    t5 = tmp_path / "t5.bin"
    t5.write_bytes(b"t5")
    base = {"manifest": tmp_path, "t5xxl": t5, "t5_tokenizer": None, "out": tmp_path, "shard": 0, "max_length": 8}
    no_clip = text_identity(CacheTextConfig(clip_l=None, clip_tokenizer=None, apply_t5_attn_mask=True, **base))
    assert no_clip["clip"] is None and no_clip["clip_tok"] is None and no_clip["mask"] is True


def test_validate_rule_refuses_flux_as_chroma_and_the_reverse(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The validate rule's command (fw.validate_files_argv + fw.validate_args) on config.yaml's model files."""
    chroma = write_chroma_demo(tmp_path)
    files = {"ae": str(demo_dir / FILES["ae"]), "t5xxl": str(demo_dir / FILES["t5xxl"])}
    flux_as_chroma = load_pipeline(chroma_config(models={"flux": str(demo_dir / FILES["flux"]), **files}))
    chroma_as_flux = load_pipeline(
        {"models": {"flux": str(chroma), "clip_l": str(demo_dir / FILES["clip_l"]), **files}}
    )
    lines = []
    for cfg in (flux_as_chroma, chroma_as_flux):
        assert main(["validate", *fw.validate_files_argv(cfg), *fw.validate_args(cfg)]) == 2
        lines += capsys.readouterr().err.splitlines()
    assert lines == [
        f"fluxpipe: error: {demo_dir / FILES['flux']}: is a FLUX.1 DiT (flux1-dev/flux1-schnell.safetensors), but "
        "was loaded as a Chroma DiT (Chroma1-Base.safetensors); use --model_type flux",
        f"fluxpipe: error: {chroma}: is a Chroma DiT (Chroma1-Base.safetensors), but was loaded as a FLUX.1 DiT "
        "(flux1-dev/flux1-schnell.safetensors); use --model_type chroma",
    ]


def test_demo_models_chroma_writes_only_the_chroma_dit(tmp_path: Path) -> None:
    assert main(["demo-models", "--chroma", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [CHROMA_FILE]
    with safe_open(str(tmp_path / CHROMA_FILE), "pt") as f:
        assert any(k.startswith("distilled_guidance_layer.") for k in f.keys())


@pytest.mark.workflow
def test_snakemake_trains_and_evaluates_a_chroma_lora_on_the_demo(demo_dir: Path, tmp_path: Path) -> None:
    """config/config.yaml of the demo with train.model_type: chroma: rule demo_chroma writes the tiny Chroma DiT,
    validate checks it as Chroma (no CLIP-L), the text cache holds the masked T5 states only, train_lora ends with
    a Chroma LoRA, evaluate_samples samples base and checkpoints with the Chroma sampler, the LoRAs attached."""
    from test_workflow import copy_repo, snakemake

    (tmp_path / "work").mkdir()
    work = copy_repo(tmp_path / "work")
    shutil.copytree(demo_dir, work / fw.DEMO_DIR)  # the FLUX demo's AE, T5 and tokenizers (rule demo_models: done)
    config = work / "config/config.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["train"].update(CHROMA_TRAIN, output_name="demo_lora", max_train_epochs=2, save_every_n_epochs=1)
    cfg["cache"].update(CHROMA_CACHE)
    cfg.update(train_full=None, train_controlnet=None)
    cfg["evaluate"].update(prompts=["a red and white striped flag"], seeds=[0], steps=2)
    config.write_text(yaml.safe_dump(cfg))
    result = snakemake(work, "train_lora", "evaluate_samples")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / fw.VALIDATE_REPORT).read_text())
    assert report["variant"] == "chroma" and set(report["models"]) == {"chroma", "ae", "t5xxl"}
    summary = json.loads((work / "results/cache/text/summary.json").read_text())
    assert summary["entries"] == 6 and summary["encoded"] == 6, summary
    final = work / "results/train/lora/demo_lora.safetensors"
    with safe_open(str(final), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("chroma", "chroma/lora")
    assert (meta["ss_guidance_scale"], meta["ss_apply_t5_attn_mask"]) == ("0.0", "True")
    metrics = json.loads((work / "results/evaluate/demo_lora/metrics.json").read_text())
    assert [c["label"] for c in metrics["checkpoints"]] == ["base", "epoch 1", "final"]
    assert (work / "results/evaluate/demo_lora/grid.png").is_file()
    log = (work / "logs/evaluate_samples.log").read_text()  # each LoRA attached to the Chroma DiT, every module
    assert log.count("kohya, 20 modules patched (0 text-encoder)") == 2, log[-2000:]


def test_fluxpipe_sample_with_a_chroma_config(demo_dir: Path, tmp_path: Path) -> None:
    """`fluxpipe sample --config` with train.model_type chroma: the Chroma DiT, no CLIP-L, the T5 mask (asked for
    or not), guidance 0: the image the Chroma sampler makes by hand."""
    from PIL import Image

    from fluxpipe.data.prompts import SamplePrompt
    from fluxpipe.inference.sampler import ModelFiles, encode_texts, load_sampler

    chroma = write_chroma_demo(tmp_path)
    models = {"flux": str(chroma), "ae": str(demo_dir / FILES["ae"]), "t5xxl": str(demo_dir / FILES["t5xxl"])}
    models["t5_tokenizer"] = str(demo_dir / T5_DIR)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(chroma_config(models=models, cache={**CHROMA_CACHE, "t5xxl_max_token_length": 8})))
    out = tmp_path / "s.png"
    argv = ["sample", "--config", str(config), "--prompt", "a flag", "--seed", "3", "--out", str(out)]
    assert main([*argv, "--width", "64", "--height", "64", "--steps", "2", "--device", "cpu"]) == 0
    ae, t5 = demo_dir / FILES["ae"], demo_dir / FILES["t5xxl"]
    files = ModelFiles(flux=chroma, ae=ae, clip_l=None, t5xxl=t5, t5_tokenizer=demo_dir / T5_DIR)
    cond = encode_texts(files, ["a flag"], device="cpu", dtype=torch.float32, max_length=8, apply_t5_attn_mask=True)
    sampler = load_sampler(files, device="cpu", dtype=torch.float32, model_type="chroma")
    p = SamplePrompt(index=0, prompt="a flag", width=64, height=64, steps=2, guidance=3.5, seed=3)
    expected = sampler.image(p, cond["a flag"], None, 3)
    with Image.open(out) as got:
        assert got.tobytes() == expected.tobytes()
