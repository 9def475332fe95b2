"""Typed config: unknown keys, wrong types and half-set model paths fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from fluxpipe import workflow
from fluxpipe.config.pipeline import load_pipeline, load_pipeline_file
from fluxpipe.config.typed import ConfigError


def test_repository_config_is_valid_and_means_demo() -> None:
    cfg = load_pipeline_file(REPO / "config" / "config.yaml")
    assert cfg.models.demo
    assert workflow.model_files(cfg)["flux"] == "results/demo_models/flux1-dev.safetensors"


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"models: unknown key\(s\) vae"):
        load_pipeline({"models": {"vae": "x"}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) modles"):
        load_pipeline({"modles": {}})


def test_wrong_type_is_named() -> None:
    with pytest.raises(ConfigError, match="models.flux: 3 is not one of str"):
        load_pipeline({"models": {"flux": 3}})


def test_all_or_no_model_files() -> None:
    with pytest.raises(ConfigError, match="missing: models.clip_l, models.t5xxl"):
        load_pipeline({"models": {"flux": "a", "ae": "b"}})


def test_configured_files_and_tokenizers_reach_the_rule() -> None:
    cfg = load_pipeline(
        {
            "models": {
                "flux": "f",
                "ae": "a",
                "clip_l": "c",
                "t5xxl": "t",
                "clip_tokenizer": "tok/clip",
                "t5_tokenizer": "",
            },
            "hash_cache": "h.json",
        }
    )
    assert workflow.model_files(cfg) == {"flux": "f", "ae": "a", "clip_l": "c", "t5xxl": "t"}
    assert workflow.validate_args(cfg) == ["--clip-tokenizer", "tok/clip", "--hash-cache", "h.json"]


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("models: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline_file(path)


@pytest.mark.parametrize(
    ("section", "flags", "says"),
    [
        ("train", {"network_dim": "x"}, "train: argument --network_dim"),
        ("train_full", {"fused_backward_pass": True, "optimizer_type": "AdamW"}, "train_full: --fused_backward_pass"),
        ("train_controlnet", {"bogus_flag": 1}, "train_controlnet:"),
        ("train_full", {"output_dir": "elsewhere"}, "output_dir come from models / dataset_config"),
    ],
)
def test_bad_training_flags_name_their_section(section: str, flags: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_pipeline({section: flags})


def test_full_and_controlnet_rules_get_the_pipeline_files() -> None:
    cfg = load_pipeline_file(REPO / "config/config.yaml")
    argv = workflow.method_argv(cfg, "full")
    assert argv[argv.index("--output_dir") + 1] == "results/train/full"
    assert argv[argv.index("--pretrained_model_name_or_path") + 1] == workflow.DEMO_FILES["flux"]
    assert "--fused_backward_pass" in argv and "--full_bf16" in argv
    assert workflow.method_output(cfg, "controlnet") == "results/train/controlnet/demo_controlnet.safetensors"


def test_profiles_name_only_rules_of_the_workflow() -> None:
    import re

    import yaml

    rules = set(re.findall(r"^rule (\w+):", "".join(p.read_text() for p in (REPO / "rules").glob("*.smk")), re.M))
    slurm = yaml.safe_load((REPO / "config/profiles/slurm/config.yaml").read_text())
    assert slurm["executor"] == "slurm" and set(slurm["set-resources"]) <= rules
    assert all(r["gpu"] >= 1 and r.get("tasks_per_gpu", 1) in (0, 1) for r in slurm["set-resources"].values())
    local = yaml.safe_load((REPO / "config/profiles/local/config.yaml").read_text())
    assert local["cores"] >= 1


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [("train_processes", 0, "not a positive number"), ("train_segment_steps", -5, "is negative")],
)
def test_scale_out_settings_are_checked(key: str, value: int, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_pipeline({key: value})
