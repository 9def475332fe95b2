"""Sample prompt files: the reference's .txt, .toml and .json formats give the same typed settings; bad files fail
with one line naming the file (and the .txt line)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from fluxpipe.data.prompts import SamplePrompt, load_prompts, parse_prompt_line
from fluxpipe.errors import FluxpipeError

TXT = """\
# sample prompts for the cat LoRA
a cat on a mat --w 1000 --h 30 --d 42 --s 0 --g 4 --l 2.5 --n blurry, low  quality --cn ctrl/pose.png

   # an indented comment
a dog in the rain --s 5000 --W 768 --ss euler_a
a house
"""

TOML = """\
[prompt]
width = 768
sample_sampler = "euler_a"

[[prompt.subset]]
prompt = "a cat on a mat"
width = 1000
height = 30
seed = 42
sample_steps = 0
guidance_scale = 4
scale = 2.5
negative_prompt = "blurry, low  quality"
controlnet_image = "ctrl/pose.png"

[[prompt.subset]]
prompt = "a dog in the rain"
sample_steps = 5000

[[prompt.subset]]
prompt = "a house"
width = 512
"""

JSON = [
    {
        "prompt": "a cat on a mat",
        "width": 1000,
        "height": 30,
        "seed": 42,
        "sample_steps": 0,
        "guidance_scale": 4,
        "scale": 2.5,
        "negative_prompt": "blurry, low  quality",
        "controlnet_image": "ctrl/pose.png",
    },
    "a dog in the rain --s 5000 --w 768 --ss euler_a",
    "a house",
]

DEFAULTS = {
    "negative_prompt": "",
    "width": 512,
    "height": 512,
    "seed": None,
    "steps": 20,
    "guidance": 3.5,
    "cfg_scale": 1.0,
    "control_image": None,
    "reference_image": None,
}


def expected(folder: Path) -> list[dict[str, Any]]:
    """The three prompts above, written out by hand (1000 -> 992, 30 -> 64, steps 0 -> 1 and 5000 -> 1000)."""
    return [
        {
            "index": 0,
            "prompt": "a cat on a mat",
            "negative_prompt": "blurry, low  quality",
            "width": 992,
            "height": 64,
            "seed": 42,
            "steps": 1,
            "guidance": 4.0,
            "cfg_scale": 2.5,
            "control_image": folder / "ctrl" / "pose.png",
            "reference_image": None,
        },
        {**DEFAULTS, "index": 1, "prompt": "a dog in the rain", "width": 768, "steps": 1000},
        {**DEFAULTS, "index": 2, "prompt": "a house"},
    ]


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


def as_dicts(prompts: list[SamplePrompt]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(p) for p in prompts]


def error_of(path: Path) -> str:
    with pytest.raises(FluxpipeError) as info:
        load_prompts(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message
    return message


@pytest.mark.parametrize("name,text", [("p.txt", TXT), ("p.toml", TOML), ("p.json", json.dumps(JSON))])
def test_each_format_gives_the_hand_written_settings(tmp_path: Path, name: str, text: str) -> None:
    prompts = load_prompts(write(tmp_path / "prompts", name, text))
    assert as_dicts(prompts) == expected(tmp_path / "prompts")
    assert all(type(p.guidance) is float and type(p.cfg_scale) is float for p in prompts)


def test_the_three_formats_parse_into_equal_lists(tmp_path: Path) -> None:
    txt = load_prompts(write(tmp_path, "p.txt", TXT))
    toml = load_prompts(write(tmp_path, "p.toml", TOML))
    from_json = load_prompts(write(tmp_path, "p.json", json.dumps(JSON)))
    assert len(txt) == 3 and txt == toml == from_json


@pytest.mark.parametrize("size,floored", [(1000, 992), (30, 64), (1024, 1024), (1039, 1024), (80, 80), (63, 64)])
def test_width_and_height_are_floored_to_16(tmp_path: Path, size: int, floored: int) -> None:
    prompt = parse_prompt_line(f"x --w {size} --h {size}", 0, tmp_path)
    assert (prompt.width, prompt.height) == (floored, floored)
    [from_toml] = load_prompts(write(tmp_path, "p.toml", f'[[prompt.subset]]\nprompt = "x"\nwidth = {size}\n'))
    assert from_toml.width == floored


@pytest.mark.parametrize("steps,clamped", [(0, 1), (1, 1), (28, 28), (1000, 1000), (5000, 1000)])
def test_steps_are_clamped(tmp_path: Path, steps: int, clamped: int) -> None:
    assert parse_prompt_line(f"x --s {steps}", 0, tmp_path).steps == clamped
    [from_json] = load_prompts(write(tmp_path, "p.json", json.dumps([{"prompt": "x", "sample_steps": steps}])))
    assert from_json.steps == clamped


def test_a_line_without_options_takes_the_defaults(tmp_path: Path) -> None:
    prompt = parse_prompt_line("  a photo of a cat, 35mm  ", 4, tmp_path)
    assert dataclasses.asdict(prompt) == {**DEFAULTS, "index": 4, "prompt": "a photo of a cat, 35mm"}


def test_negative_prompt_keeps_its_spaces_and_any_option_order(tmp_path: Path) -> None:
    prompt = parse_prompt_line("a cat --n ugly, bad hands,  extra fingers --d 7", 0, tmp_path)
    assert (prompt.prompt, prompt.negative_prompt, prompt.seed) == ("a cat", "ugly, bad hands,  extra fingers", 7)


def test_tables_trim_text_like_txt_lines(tmp_path: Path) -> None:
    toml = '[[prompt.subset]]\nprompt = "  a cat "\nnegative_prompt = " blurry  "\ncontrolnet_image = " c.png "\n'
    [from_toml] = load_prompts(write(tmp_path, "p.toml", toml))
    [from_txt] = load_prompts(write(tmp_path, "p.txt", "a cat  --n  blurry   --cn  c.png \n"))
    assert from_toml == from_txt
    assert (from_toml.prompt, from_toml.negative_prompt, from_toml.control_image) == (
        "a cat",
        "blurry",
        tmp_path / "c.png",
    )


def test_control_image_is_resolved_against_the_prompt_files_folder(tmp_path: Path) -> None:
    folder = tmp_path / "config" / "samples"
    absolute = tmp_path / "elsewhere" / "edge.png"
    text = f"a --cn pose.png\nb --cn ../poses/p 1.png\nc --cn {absolute}\nd\n"
    controls = [p.control_image for p in load_prompts(write(folder, "p.txt", text))]
    assert controls == [folder / "pose.png", folder / ".." / "poses" / "p 1.png", absolute, None]
    assert parse_prompt_line("a --cn x.png", 0, tmp_path / "base").control_image == tmp_path / "base" / "x.png"


def test_comments_and_blank_lines_are_skipped_and_indexes_count_prompts(tmp_path: Path) -> None:
    text = "# header\n\n\nfirst\n  # indented comment\n\t\nsecond # not a comment\n#last --w 64\n"
    prompts = load_prompts(write(tmp_path, "p.txt", text))
    assert [(p.index, p.prompt) for p in prompts] == [(0, "first"), (1, "second # not a comment")]


def test_option_names_ignore_case_and_a_stray_separator_is_skipped(tmp_path: Path) -> None:
    prompt = parse_prompt_line("a cat --W 640 --H 320 --S 8 --G 2.0 --L 3 --", 0, tmp_path)
    assert (prompt.width, prompt.height, prompt.steps, prompt.guidance, prompt.cfg_scale) == (640, 320, 8, 2.0, 3.0)


def test_json_null_means_unset(tmp_path: Path) -> None:
    [prompt] = load_prompts(write(tmp_path, "p.json", json.dumps([{"prompt": "x", "seed": None, "width": None}])))
    assert (prompt.seed, prompt.width) == (None, 512)


def test_unused_reference_options_are_accepted_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = "a --ss euler --ctr 0.25\nb --rcfg 1.0 --fs 3.1 --ss ddim\nc --w 768\n"
    with caplog.at_level(logging.WARNING, logger="fluxpipe.data.prompts"):
        prompts = load_prompts(write(tmp_path, "p.txt", text))
    assert [p.prompt for p in prompts] == ["a", "b", "c"] and prompts[2].width == 768
    [record] = caplog.records
    assert all(name in record.getMessage() for name in ("--ss", "--ctr", "--rcfg", "--fs", "p.txt"))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxpipe.data.prompts"):
        load_prompts(write(tmp_path, "q.toml", TOML))
    [record] = caplog.records
    assert "sample_sampler" in record.getMessage()


def test_no_warning_without_unused_options(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fluxpipe.data.prompts"):
        load_prompts(write(tmp_path, "p.txt", "a --w 768\n"))
        parse_prompt_line("b --s 4", 0, tmp_path)
    assert caplog.records == []


@pytest.mark.parametrize(
    "line,words",
    [
        ("a cat --x 1", ["line 3", "--x", "unknown option"]),
        ("a cat --w abc", ["line 3", "--w", "'abc'"]),
        ("a cat --h 512.5", ["line 3", "--h", "'512.5'"]),
        ("a cat --d -1", ["line 3", "--d", "-1"]),
        ("a cat --g nan", ["line 3", "--g", "nan"]),
        ("a cat --l high", ["line 3", "--l", "'high'"]),
        ("a cat --w", ["line 3", "--w", "no value"]),
        ("--w 512 --h 512", ["line 3", "prompt is empty"]),
    ],
)
def test_bad_txt_lines_name_the_file_line_and_option(tmp_path: Path, line: str, words: list[str]) -> None:
    message = error_of(write(tmp_path, "samples.txt", f"# comment\ngood prompt\n{line}\n"))
    assert all(word in message for word in words), message


def test_parse_prompt_line_raises_on_a_bad_option(tmp_path: Path) -> None:
    with pytest.raises(FluxpipeError, match="--s"):
        parse_prompt_line("a cat --s many", 0, tmp_path)


@pytest.mark.parametrize(
    "text,words",
    [
        ('[[prompt.subset]]\nprompt = "x"\nwidht = 512\n', ["prompt.subset[0]", "'widht'", "'width'"]),
        ('[prompt]\ncolour = "red"\n[[prompt.subset]]\nprompt = "x"\n', ["[prompt]", "'colour'"]),
        (
            '[[prompt.subset]]\nprompt = "x"\n[[prompt.subset]]\nprompt = "y"\nwidth = "wide"\n',
            ["prompt.subset[1]", "width", "'wide'"],
        ),
        ('[[prompt.subset]]\nprompt = "x"\nseed = true\n', ["seed", "True"]),
        ('[[prompt.subset]]\nprompt = "  "\n', ["prompt.subset[0]", "prompt is empty"]),
        ('[[prompt.subset]]\nnegative_prompt = "x"\n', ["prompt is empty"]),
        ("[prompt\nwidth = 512\n", ["not valid TOML"]),
        ("[general]\nwidth = 512\n", ["[prompt]", "general"]),
        ("[prompt]\nsubset = 3\n", ["[[prompt.subset]]"]),
        ("[prompt]\nwidth = 512\n", ["no prompts"]),
    ],
)
def test_bad_toml_names_the_file_and_the_key(tmp_path: Path, text: str, words: list[str]) -> None:
    message = error_of(write(tmp_path, "samples.toml", text))
    assert all(word in message for word in words), message


@pytest.mark.parametrize(
    "data,words",
    [
        ([{"prompt": "x", "sampler": "euler"}], ["item 0", "'sampler'"]),
        (["ok", {"prompt": "x", "width": "512"}], ["item 1", "width", "'512'"]),
        (["ok", {"prompt": "x", "scale": False}], ["item 1", "scale"]),
        (["ok", "x --w abc"], ["item 1", "--w", "'abc'"]),
        (["ok", 42], ["item 1", "int"]),
        (["ok", ""], ["item 1", "prompt is empty"]),
        ([{"width": 512}], ["item 0", "prompt is empty"]),
        ({"prompt": "x"}, ["list"]),
        ([], ["no prompts"]),
    ],
)
def test_bad_json_names_the_file_and_the_item(tmp_path: Path, data: Any, words: list[str]) -> None:
    message = error_of(write(tmp_path, "samples.json", json.dumps(data)))
    assert all(word in message for word in words), message


@pytest.mark.parametrize(
    "name,text,words",
    [
        ("samples.json", '[{"prompt": "x",}]', ["not valid JSON"]),
        ("samples.yaml", "- x\n", ["'.yaml'", ".txt, .toml or .json"]),
        ("samples.txt", "# only comments\n\n", ["no prompts"]),
    ],
)
def test_unusable_files_are_one_error_naming_the_file(tmp_path: Path, name: str, text: str, words: list[str]) -> None:
    message = error_of(write(tmp_path, name, text))
    assert all(word in message for word in words), message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    message = error_of(tmp_path / "nowhere.txt")
    assert "not found" in message


def test_text_is_never_evaluated(tmp_path: Path) -> None:
    text = "__import__('os').getcwd() --n 1+1\n"
    [prompt] = load_prompts(write(tmp_path, "p.txt", text))
    assert (prompt.prompt, prompt.negative_prompt) == ("__import__('os').getcwd()", "1+1")
    message = error_of(write(tmp_path, "q.json", json.dumps([{"prompt": "x", "width": "256 * 4"}])))
    assert "'256 * 4'" in message
