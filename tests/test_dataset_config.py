"""Dataset config: the reference's TOML verbatim, merged by precedence; bad keys/values fail naming key and file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from fluxpipe.config.dataset import (
    DatasetConfig,
    SubsetConfig,
    check_cacheable,
    dataset_kind,
    folder_datasets,
    load_dataset_toml,
    parse_datasets,
)
from fluxpipe.config.typed import ConfigError

REPO = Path(__file__).resolve().parents[1]

TYPICAL = """
[general]
shuffle_caption = false
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 1
enable_bucket = true

  [[datasets.subsets]]
  image_dir = "img"
  num_repeats = 10
  class_tokens = "aaa"

  [[datasets.subsets]]
  is_reg = true
  image_dir = "reg"
  class_tokens = "bbb"
  num_repeats = 1
"""

MULTI_RES = """
[general]
flip_aug = true
caption_extension = ".txt"
enable_bucket = true
bucket_no_upscale = true

[[datasets]]
resolution = 1024
batch_size = 2
  [[datasets.subsets]]
  image_dir = "train"
  num_repeats = 1

[[datasets]]
resolution = 768
batch_size = 3
  [[datasets.subsets]]
  image_dir = "train"
  num_repeats = 1

[[datasets]]
resolution = [512, 512]
batch_size = 4
  [[datasets.subsets]]
  image_dir = "train"
  num_repeats = 1
"""


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _one(
    subset: dict[str, Any] | None = None, dataset: dict[str, Any] | None = None, general: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A one-dataset, one-subset structure with the given extra keys."""
    data: dict[str, Any] = {
        "datasets": [{"resolution": 512, **(dataset or {}), "subsets": [{"image_dir": "img", **(subset or {})}]}]
    }
    if general is not None:
        data["general"] = general
    return data


def _fails(data: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_datasets(data, "d.toml")


def test_typical_reference_toml(tmp_path: Path) -> None:
    path = _toml(tmp_path, TYPICAL)
    cfg = load_dataset_toml(path)
    assert cfg.source == str(path)
    (ds,) = cfg.datasets
    assert ds.resolution == (512, 512) and ds.batch_size == 1 and ds.enable_bucket
    assert (ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps) == (256, 1024, 64)
    train, reg = ds.subsets
    assert train == SubsetConfig(
        image_dir="img",
        num_repeats=10,
        class_tokens="aaa",
        caption_extension=".txt",
        keep_tokens=1,
        shuffle_caption=False,
    )
    assert reg == SubsetConfig(
        image_dir="reg", num_repeats=1, class_tokens="bbb", is_reg=True, caption_extension=".txt", keep_tokens=1
    )
    assert dataset_kind(ds) == "dreambooth"


def test_flux_multi_resolution_example(tmp_path: Path) -> None:
    cfg = load_dataset_toml(_toml(tmp_path, MULTI_RES))
    assert [d.resolution for d in cfg.datasets] == [(1024, 1024), (768, 768), (512, 512)]
    assert [d.batch_size for d in cfg.datasets] == [2, 3, 4]
    assert all(d.enable_bucket and d.bucket_no_upscale for d in cfg.datasets)
    assert {d.subsets for d in cfg.datasets} == {
        (SubsetConfig(image_dir="train", flip_aug=True, caption_extension=".txt"),)
    }


def test_demo_dataset_of_the_repository() -> None:
    cfg = load_dataset_toml(REPO / "config" / "demo" / "dataset.toml")
    (ds,) = cfg.datasets
    assert ds.resolution == (256, 256) and ds.batch_size == 2 and ds.min_bucket_reso == 128
    assert ds.subsets[0].image_dir == "config/demo/images" and ds.subsets[0].num_repeats == 2


def test_precedence_subset_over_dataset_over_general() -> None:
    data = {
        "general": {
            "keep_tokens": 1,
            "caption_extension": "txt",
            "flip_aug": True,
            "batch_size": 7,
            "resize_interpolation": "lanczos",
        },
        "datasets": [
            {
                "resolution": [1024, 768],
                "keep_tokens": 2,
                "resize_interpolation": "area",
                "subsets": [{"image_dir": "a", "keep_tokens": 3}, {"image_dir": "b"}],
            },
            {"resolution": 512, "batch_size": 2, "subsets": [{"image_dir": "c", "flip_aug": False}]},
        ],
    }
    first, second = parse_datasets(data, "config.yaml:dataset").datasets
    assert first.resolution == (1024, 768) and first.batch_size == 7 and first.resize_interpolation == "area"
    assert [s.keep_tokens for s in first.subsets] == [3, 2]
    assert [s.resize_interpolation for s in first.subsets] == ["area", "area"]
    assert all(s.caption_extension == ".txt" and s.flip_aug for s in first.subsets)  # dot added
    assert second.batch_size == 2 and second.resize_interpolation == "lanczos"
    (c,) = second.subsets
    assert c.keep_tokens == 1 and c.flip_aug is False and c.resize_interpolation == "lanczos"


def test_mapping_equals_toml(tmp_path: Path) -> None:
    data = {
        "general": {"shuffle_caption": False, "caption_extension": ".txt", "keep_tokens": 1},
        "datasets": [
            {
                "resolution": 512,
                "batch_size": 1,
                "enable_bucket": True,
                "subsets": [
                    {"image_dir": "img", "num_repeats": 10, "class_tokens": "aaa"},
                    {"is_reg": True, "image_dir": "reg", "class_tokens": "bbb", "num_repeats": 1},
                ],
            }
        ],
    }
    from_yaml = parse_datasets(data, "config.yaml:dataset")
    assert from_yaml.datasets == load_dataset_toml(_toml(tmp_path, TYPICAL)).datasets
    assert from_yaml.source == "config.yaml:dataset"


def test_null_in_yaml_means_unset() -> None:
    (ds,) = parse_datasets(_one({"num_repeats": None}, {"batch_size": None}, {"caption_extension": None}), "y").datasets
    assert ds.batch_size == 1 and ds.subsets[0].num_repeats == 1 and ds.subsets[0].caption_extension == ".caption"


def test_all_subset_keys_accepted(tmp_path: Path) -> None:
    text = """
[[datasets]]
resolution = [768, 512]
network_multiplier = 0.5
validation_split = 0.1
validation_seed = 3
  [[datasets.subsets]]
  image_dir = "a"
  alpha_mask = true
  conditioning_data_dir = "cond"
  caption_separator = ";"
  keep_tokens_separator = "|||"
  secondary_separator = ";;;"
  caption_prefix = "photo of "
  caption_suffix = ", best"
  face_crop_aug_range = [2, 4.0]
  token_warmup_min = 2
  token_warmup_step = 0.5
  caption_dropout_rate = 0.1
  caption_dropout_every_n_epochs = 3
  caption_tag_dropout_rate = 0.2
  custom_attributes = {}
  resize_interpolation = "box"
"""
    (ds,) = load_dataset_toml(_toml(tmp_path, text)).datasets
    assert ds.resolution == (768, 512) and ds.network_multiplier == 0.5
    assert ds.validation_split == 0.1 and ds.validation_seed == 3
    (s,) = ds.subsets
    assert s.face_crop_aug_range == (2.0, 4.0) and isinstance(s.face_crop_aug_range[0], float)
    assert s.custom_attributes == {} and s.resize_interpolation == "box"
    assert s.token_warmup_step == 0.5 and s.caption_dropout_every_n_epochs == 3
    assert dataset_kind(ds) == "controlnet"


def test_validation_split_int_zero_is_float() -> None:
    (ds,) = parse_datasets(_one(dataset={"validation_split": 0}), "d").datasets
    assert ds.validation_split == 0.0 and isinstance(ds.validation_split, float)


# --- errors: each names the file and the key's location ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        (_one({"num_repeats": "3"}), r"^d\.toml: datasets\[0\]\.subsets\[0\]\.num_repeats: expected int, got '3'$"),
        (_one({"num_repeat": 3}), r"datasets\[0\]\.subsets\[0\]\.num_repeat: unknown key; did you mean num_repeats\?"),
        (_one(general={"shuffle_captions": True}), r"^d\.toml: general\.shuffle_captions: unknown key"),
        (_one(dataset={"bach_size": 2}), r"datasets\[0\]\.bach_size: unknown key; did you mean batch_size"),
        ({"general": {}, "dataset": []}, r"^d\.toml: dataset: unknown top-level key"),
        (_one({"batch_size": 2}), r"datasets\[0\]\.subsets\[0\]\.batch_size: a dataset-level key"),
        (_one({"resolution": 512}), r"datasets\[0\]\.subsets\[0\]\.resolution: a dataset-level key"),
        (_one(general={"image_dir": "x"}), r"general\.image_dir: a subset-only key"),
        (_one(dataset={"is_reg": True}), r"datasets\[0\]\.is_reg: a subset-only key"),
        (_one(dataset={"alpha_mask": True}), r"datasets\[0\]\.alpha_mask: a subset-only key"),
        (_one({"flip_aug": 1}), r"subsets\[0\]\.flip_aug: expected bool, got 1"),
        (_one({"image_dir": 3}), r"subsets\[0\]\.image_dir: expected str, got 3"),
        (_one(general={"keep_tokens": True}), r"general\.keep_tokens: expected int, got True"),
        (_one(dataset={"network_multiplier": "1"}), r"datasets\[0\]\.network_multiplier: expected float"),
        (
            _one(dataset={"resolution": "1024,1024"}),
            r"datasets\[0\]\.resolution: got the string '1024,1024'; "
            r"write .*resolution = 1024 or resolution = \[1024, 1024\]",
        ),
        (_one(dataset={"resolution": [1024]}), r"datasets\[0\]\.resolution: expected a 2-element array"),
        (_one(dataset={"resolution": [1024, 7.5]}), r"datasets\[0\]\.resolution\[1\]: expected int, got 7\.5"),
        (_one(dataset={"resolution": 0}), r"datasets\[0\]\.resolution: must be positive"),
        ({"datasets": [{"subsets": [{"image_dir": "a"}]}]}, r"datasets\[0\]\.resolution: required"),
        (_one(dataset={"validation_split": 1}), r"datasets\[0\]\.validation_split: must be in \[0, 1\).*got 1\.0"),
        (_one(dataset={"validation_split": 1.5}), r"validation_split: must be in \[0, 1\)"),
        (_one({"num_repeats": -1}), r"subsets\[0\]\.num_repeats: must be >= 0"),
        (_one(dataset={"batch_size": 0}), r"datasets\[0\]\.batch_size: must be >= 1, got 0"),
        (_one({"caption_dropout_rate": 1.5}), r"subsets\[0\]\.caption_dropout_rate: must be in \[0, 1\], got 1\.5"),
        (_one(general={"caption_tag_dropout_rate": -0.1}), r"general\.caption_tag_dropout_rate: must be in \[0, 1\]"),
        (
            _one(dataset={"min_bucket_reso": 1024, "max_bucket_reso": 512}),
            r"datasets\[0\]: min_bucket_reso 1024 > max_bucket_reso 512",
        ),
        (
            _one(dataset={"resolution": 2048, "enable_bucket": True}),
            r"datasets\[0\]\.resolution: 2048x2048 lies outside the bucket range 256\.\.1024",
        ),
        (
            _one({"resize_interpolation": "bicubik"}),
            r"subsets\[0\]\.resize_interpolation: must be one of lanczos, .*box",
        ),
        (_one(dataset={"resize_interpolation": "Area"}), r"datasets\[0\]\.resize_interpolation: must be one of"),
        (_one({"face_crop_aug_range": [4.0, 2.0]}), r"face_crop_aug_range: must be \[low, high\] with 0 < low <= high"),
        (_one({"face_crop_aug_range": 2.0}), r"face_crop_aug_range: expected a 2-element array"),
        (_one({"caption_separator": ""}), r"caption_separator: must be a non-empty string"),
        (_one({"custom_attributes": "x"}), r"custom_attributes: expected dict"),
        ({"datasets": [{"resolution": 512}]}, r"^d\.toml: datasets\[0\]: no \[\[datasets\.subsets\]\]"),
        ({"datasets": [{"resolution": 512, "subsets": []}]}, r"datasets\[0\]: no \[\[datasets\.subsets\]\]"),
        (
            {"datasets": [{"resolution": 512, "subsets": {"image_dir": "a"}}]},
            r"datasets\[0\]\.subsets: expected an array of tables",
        ),
        ({"general": {}}, r"^d\.toml: no \[\[datasets\]\]"),
        ({"datasets": []}, r"datasets: expected a non-empty array"),
        (
            _one({"image_dir": None, "class_tokens": "a"}),
            r"datasets\[0\]\.subsets\[0\]: set image_dir .* or metadata_file",
        ),
        ({"general": "x", "datasets": []}, r"general: expected a table"),
    ],
)
def test_errors_name_the_key(data: dict[str, Any], pattern: str) -> None:
    _fails(data, pattern)


def test_error_names_the_second_subset() -> None:
    data = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "a"}, {"image_dir": "b", "num_repeats": "3"}]}]}
    with pytest.raises(ConfigError) as e:
        parse_datasets(data, "x.toml")
    assert str(e.value) == "x.toml: datasets[0].subsets[1].num_repeats: expected int, got '3'"


def test_num_repeats_zero_is_allowed() -> None:
    (ds,) = parse_datasets(_one({"num_repeats": 0}), "d").datasets
    assert ds.subsets[0].num_repeats == 0


def test_bucket_range_is_snapped_to_steps() -> None:
    # max 1000 rounds up to 1024 with steps 64, so resolution 1024 fits (as in the reference)
    (ds,) = parse_datasets(
        _one(dataset={"resolution": 1024, "enable_bucket": True, "max_bucket_reso": 1000}), "d"
    ).datasets
    assert ds.max_bucket_reso == 1000
    # without buckets the range is not used
    parse_datasets(_one(dataset={"resolution": 2048}), "d")


def test_dataset_kinds() -> None:
    ft = {
        "datasets": [
            {
                "resolution": 512,
                "subsets": [{"metadata_file": "a.json"}, {"metadata_file": "b.jsonl", "image_dir": "b"}],
            }
        ]
    }
    assert dataset_kind(parse_datasets(ft, "d").datasets[0]) == "finetune"
    cn = _one({"conditioning_data_dir": "c"})
    assert dataset_kind(parse_datasets(cn, "d").datasets[0]) == "controlnet"
    assert dataset_kind(parse_datasets(_one(), "d").datasets[0]) == "dreambooth"


@pytest.mark.parametrize(
    ("subsets", "pattern"),
    [
        ([{"image_dir": "a"}, {"metadata_file": "m.json"}], r"subsets 1 have metadata_file .* but 0 do not"),
        (
            [{"image_dir": "a", "conditioning_data_dir": "c"}, {"image_dir": "b"}],
            r"subsets 0 have conditioning_data_dir but 1 do not",
        ),
        (
            [{"image_dir": "a", "conditioning_data_dir": "c", "metadata_file": "m.json"}],
            r"subsets 0: metadata_file is not used by ControlNet",
        ),
        ([{"metadata_file": "m.json", "is_reg": True}], r"subsets 0: is_reg is for DreamBooth"),
    ],
)
def test_mixed_kinds_fail_at_load(subsets: list[dict[str, Any]], pattern: str) -> None:
    _fails({"datasets": [{"resolution": 512, "subsets": subsets}]}, r"^d\.toml: datasets\[0\]: " + pattern)


def test_dataset_kind_of_a_hand_built_mix() -> None:
    ds = DatasetConfig(
        resolution=(512, 512), subsets=(SubsetConfig(image_dir="a"), SubsetConfig(metadata_file="m.json"))
    )
    with pytest.raises(ConfigError, match="metadata_file"):
        dataset_kind(ds)


# --- files ---------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nope.toml'}: dataset config not found")):
        load_dataset_toml(tmp_path / "nope.toml")


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[general]\nkeep_tokens = 1\n\n[[datasets]]\nresolution = 1024,1024\n")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + r": not valid TOML \(.*line 5"):
        load_dataset_toml(path)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, TYPICAL.replace("num_repeats = 10", 'num_repeats = "10"'))
    with pytest.raises(ConfigError) as e:
        load_dataset_toml(path)
    assert str(e.value) == f"{path}: datasets[0].subsets[0].num_repeats: expected int, got '10'"


# --- caching -------------------------------------------------------------------------------------------------------


NO_UNCACHED = "which the latent cache cannot give: turn cache_latents off"


@pytest.mark.parametrize(
    ("option", "value", "reason"),
    [
        ("color_aug", True, "needs a fresh latent every step, " + NO_UNCACHED),
        ("random_crop", True, "needs a fresh latent every step"),
    ],
)
def test_latent_cache_blockers(option: str, value: Any, reason: str) -> None:
    data = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "ok"}, {"image_dir": "img", option: value}]}]}
    cfg = parse_datasets(data, "d.toml")
    with pytest.raises(
        ConfigError, match=r"^d\.toml: datasets\[0\]\.subsets\[1\]\." + option + r" = .*'img'.*" + re.escape(reason)
    ):
        check_cacheable(cfg, cache_latents=True, cache_text=False)
    check_cacheable(cfg, cache_latents=False, cache_text=True)


def test_face_crop_needs_uncached_latents_without_buckets(caplog: pytest.LogCaptureFixture) -> None:
    data = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "img", "face_crop_aug_range": [2.0, 4.0]}]}]}
    cfg = parse_datasets(data, "d.toml")
    with pytest.raises(ConfigError, match=r"subsets\[0\]\.face_crop_aug_range = \(2\.0, 4\.0\).*" + NO_UNCACHED):
        check_cacheable(cfg, cache_latents=True, cache_text=False)
    check_cacheable(cfg, cache_latents=False, cache_text=True)
    assert "face_crop_aug_range" not in caplog.text
    # with buckets the reference ignores it: a warning, and nothing to refuse with the latent cache
    data["datasets"][0]["enable_bucket"] = True
    with caplog.at_level("WARNING"):
        check_cacheable(parse_datasets(data, "d.toml"), cache_latents=True, cache_text=True)
    assert "face_crop_aug_range (subsets 0) has no effect with enable_bucket" in caplog.text


def test_token_warmup_is_refused_with_the_text_cache() -> None:
    cfg = parse_datasets(_one(general={"token_warmup_step": 10}), "d.toml")
    with pytest.raises(ConfigError, match=r"subsets\[0\]\.token_warmup_step = 10.*turn off cache_text_encoder_outputs"):
        check_cacheable(cfg, cache_latents=False, cache_text=True)
    check_cacheable(cfg, cache_latents=True, cache_text=False)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("shuffle_caption", True),
        ("caption_dropout_rate", 0.1),
        ("caption_tag_dropout_rate", 0.1),
        ("enable_wildcard", True),
        ("caption_dropout_every_n_epochs", 2),
        ("alpha_mask", True),
    ],
)
def test_caption_augmentation_and_alpha_masks_are_cacheable(option: str, value: Any) -> None:
    where = "subsets" if option == "alpha_mask" else "general"
    data = _one({option: value}) if where == "subsets" else _one(general={option: value})
    check_cacheable(parse_datasets(data, "d.toml"), cache_latents=True, cache_text=True)


def test_cacheable_allows_deterministic_options() -> None:
    cfg = parse_datasets(
        _one(
            {
                "caption_prefix": "photo of ",
                "caption_suffix": ", sks",
                "flip_aug": True,
                "keep_tokens": 2,
                "secondary_separator": ";;;",
                "caption_dropout_rate": 0.0,
            }
        ),
        "d",
    )
    check_cacheable(cfg, cache_latents=True, cache_text=True)


def test_ignored_subsets_do_not_block_caching() -> None:
    data = {
        "datasets": [
            {
                "resolution": 512,
                "subsets": [{"image_dir": "a"}, {"image_dir": "b", "num_repeats": 0, "color_aug": True}],
            }
        ]
    }
    check_cacheable(parse_datasets(data, "d"), cache_latents=True, cache_text=True)


def test_configs_are_frozen() -> None:
    (ds,) = parse_datasets(_one(), "d").datasets
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.batch_size = 2  # type: ignore[misc]


def test_command_line_values_rank_below_general() -> None:
    """spec §9: subset > dataset > general > command line (--train_batch_size is batch_size) > defaults."""
    cli = {"batch_size": 3, "caption_extension": "txt", "resize_interpolation": "nearest", "flip_aug": True}
    (ds,) = parse_datasets(_one(), "d.toml", cli).datasets
    assert ds.batch_size == 3 and ds.subsets[0].caption_extension == ".txt" and ds.subsets[0].flip_aug
    assert ds.subsets[0].resize_interpolation == "nearest"
    (ds,) = parse_datasets(
        _one({"caption_extension": ".cap"}, {"batch_size": 2}, {"flip_aug": False}), "d.toml", cli
    ).datasets
    assert ds.batch_size == 2 and ds.subsets[0].caption_extension == ".cap" and not ds.subsets[0].flip_aug
    with pytest.raises(ConfigError, match="command line.batch_size: must be >= 1"):
        parse_datasets(_one(), "d.toml", {"batch_size": 0})


def test_toml_without_batch_size_takes_the_command_line_one(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = 'img'\n")
    assert load_dataset_toml(path).datasets[0].batch_size == 1
    assert load_dataset_toml(path, {"batch_size": 3}).datasets[0].batch_size == 3


def test_json_dataset_config_reads_as_the_toml(tmp_path: Path) -> None:
    import json
    import tomllib

    (tmp_path / "d.json").write_text(json.dumps(tomllib.loads(TYPICAL)), encoding="utf-8")
    assert load_dataset_toml(tmp_path / "d.json").datasets == load_dataset_toml(_toml(tmp_path, TYPICAL)).datasets
    (tmp_path / "bad.json").write_text("{resolution: 512", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        load_dataset_toml(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "subset, pattern",
    [
        ({"cache_info": True}, r"subsets\[0\].cache_info: not supported .*remove it"),
        (
            {"custom_attributes": {"diff_output_preserve": True}},
            r"subsets\[0\].custom_attributes.diff_output_preserve: unknown attribute.*remove it",
        ),
        (
            {"custom_attributes": {"diff_output_preservation": "yes"}},
            r"custom_attributes.diff_output_preservation: expected true or false",
        ),
    ],
)
def test_unsupported_subset_keys_are_refused(subset: dict[str, Any], pattern: str) -> None:
    _fails(_one(subset), pattern)
    _fails({"general": subset, **_one()}, pattern)


def test_diff_output_preservation_is_read() -> None:
    from fluxpipe.config.dataset import preserves_output

    (ds,) = parse_datasets(_one({"custom_attributes": {"diff_output_preservation": True}}), "d").datasets
    assert preserves_output(ds.subsets[0]) and not preserves_output(parse_datasets(_one(), "d").datasets[0].subsets[0])


def test_folder_mode_concept_subfolders(tmp_path: Path) -> None:
    for name in ("10_sks dog", "2_a_b", "0_skipped", "notes", "3_empty"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "1_file.txt").write_text("not a folder")
    (tmp_path / "reg" / "1_dog").mkdir(parents=True)
    data = folder_datasets(str(tmp_path / "train"), str(tmp_path / "reg"))
    assert data == {
        "datasets": [
            {
                "subsets": [
                    {
                        "image_dir": str(tmp_path / "train/10_sks dog"),
                        "num_repeats": 10,
                        "is_reg": False,
                        "class_tokens": "sks dog",
                    },
                    {
                        "image_dir": str(tmp_path / "train/2_a_b"),
                        "num_repeats": 2,
                        "is_reg": False,
                        "class_tokens": "a_b",
                    },
                    {
                        "image_dir": str(tmp_path / "train/3_empty"),
                        "num_repeats": 3,
                        "is_reg": False,
                        "class_tokens": "empty",
                    },
                    {"image_dir": str(tmp_path / "reg/1_dog"), "num_repeats": 1, "is_reg": True, "class_tokens": "dog"},
                ]
            }
        ]
    }
    assert folder_datasets("imgs", in_json="meta.json") == {
        "datasets": [{"subsets": [{"image_dir": "imgs", "metadata_file": "meta.json"}]}]
    }
    with pytest.raises(ConfigError, match="--train_data_dir .*: no subfolder named N_concept"):
        folder_datasets(str(tmp_path / "reg" / "1_dog"))
    with pytest.raises(ConfigError, match="--reg_data_dir .*nowhere: not a folder"):
        folder_datasets(str(tmp_path / "train"), str(tmp_path / "nowhere"))
