"""`--help` of every command against the parser's own flags: each flag a command accepts is in its help (and no
flag it does not act on), `train full|controlnet` show their own flags, the defaults shown are the real ones."""

from __future__ import annotations

import argparse
import re

import pytest

from fluxpipe.cli import build_parser, main
from fluxpipe.cli.train_help import OWN_FLAGS, method_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):  # noqa: ANN202
    """(argv path, parser) of every command and subcommand."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


COMMANDS = sorted(path for path, _ in _commands(build_parser()))


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = main([*argv, "--help"])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    assert code in (0, None), out
    return out


def _listed(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9_-]*", text))


def test_every_command_is_covered() -> None:
    names = {p[0] for p in COMMANDS}
    assert {"validate", "demo-models", "manifest", "cache-latents", "cache-text", "cache-index", "bench"} <= names
    assert {"train", "sample", "evaluate", "lora"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_lists_each_flag_of_the_parser(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    parser = dict(_commands(build_parser()))[path]
    text = _help(list(path), capsys)
    assert text.startswith(f"usage: fluxpipe {' '.join(path)}"), text[:200]
    declared = {
        flag
        for a in parser._actions
        if a.help is not argparse.SUPPRESS
        for flag in a.option_strings
        if flag.startswith("--")
    }
    assert declared, path
    assert declared <= _listed(text), sorted(declared - _listed(text))
    assert "spec §" not in text and "§" not in text


@pytest.mark.parametrize("method", ["lora", "full", "controlnet"])
def test_train_help_is_the_methods_own(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["train", method], capsys)
    parser, hidden = method_parser(method)
    shown = {f for a in parser._actions if a.help is not argparse.SUPPRESS for f in a.option_strings}
    listed = _listed(text)
    assert {f for f in shown if f.startswith("--")} <= listed
    assert not (set(hidden) & listed), sorted(set(hidden) & listed)
    assert {flag for flag, _ in OWN_FLAGS} <= listed
    assert f"usage: fluxpipe train {method} " in text and "§" not in text
    assert re.search(r"--seed SEED\s+fluxpipe's default; the reference draws a random seed\s+\(default: 42\)", text)
    assert f"fluxpipe train {method} --help-all" in text


def test_the_methods_differ_where_the_trainers_do(capsys: pytest.CaptureFixture[str]) -> None:
    lora, full, controlnet = (_listed(_help(["train", m], capsys)) for m in ("lora", "full", "controlnet"))
    assert "--network_dim" in lora and "--network_dim" not in full and "--network_dim" not in controlnet
    assert "--fused_backward_pass" in full and "--fused_backward_pass" in lora  # (LoRA: ignored, as by the reference)
    assert "--controlnet_model_name_or_path" in controlnet
    assert "--masked_loss" in full and "--masked_loss" not in controlnet
    assert "--conditioning_data_dir" not in controlnet  # ControlNet folder mode: not yet (hidden)


def test_ignored_is_said_only_where_it_is_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    def about(text: str, flag: str) -> str:
        found = re.search(rf"\n  {flag}[ \n]", text)
        assert found, flag
        return text[found.start() + 1 :].split("\n  --")[0]

    lora, full = _help(["train", "lora"], capsys), _help(["train", "full"], capsys)
    assert "ignored for FLUX" in about(lora, "--fused_backward_pass")
    assert "ignored" not in about(full, "--fused_backward_pass")
    assert "ignored for FLUX" in about(full, "--controlnet_model_name_or_path")
    assert "ignored" not in about(_help(["train", "controlnet"], capsys), "--controlnet_model_name_or_path")


def test_help_all_marks_what_is_not_acted_on(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["train", "full", "--help-all"], capsys)
    _, hidden = method_parser("full")
    assert "--network_dim" in hidden and set(hidden) <= _listed(text)
    marked = re.search(r"--network_dim NETWORK_DIM\s+not acted on by this method yet", text)
    assert marked, text[text.find("--network_dim") :][:300]


def test_lora_help_shows_the_real_lora_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["train", "lora"], capsys)
    assert re.search(r"--network_dim NETWORK_DIM\s+\(default: 4\)", text)
    assert re.search(r"--optimizer_type OPTIMIZER_TYPE\s+\(default: AdamW\)", text)


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["validate", "--clip_l", "a.safetensors"], "clip_l", "a.safetensors"),
        (["validate", "--clip-l", "a.safetensors"], "clip_l", "a.safetensors"),
        (["validate", "--hash_cache", "h.json"], "hash_cache", "h.json"),
        (["sample", "--out", "o.png", "--prompts_file", "p.txt"], "prompts_file", "p.txt"),
        (["sample", "--out", "o.png", "--blocks_to_swap", "3"], "blocks_to_swap", 3),
        (["evaluate", "--out", "o", "--train_dir", "t"], "train_dir", "t"),
        (["lora", "resize", "--model", "m", "--save-to", "s"], "save_to", "s"),
    ],
)
def test_own_commands_accept_both_spellings(argv: list[str], dest: str, value: object) -> None:
    got = getattr(build_parser().parse_args(argv), dest)
    assert (str(got) if isinstance(value, str) else got) == value


def test_train_own_flags_in_both_spellings() -> None:
    from fluxpipe.cli.common import accept_both_spellings
    from fluxpipe.cli.train_help import add_own_flags

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_own_flags(parser)
    accept_both_spellings(parser)
    own, rest = parser.parse_known_args(["--cache-dir", "r", "--stop_at_step", "5", "--auto-resume", "--seed", "1"])
    assert (str(own.cache_dir), own.stop_at_step, own.auto_resume, rest) == ("r", 5, True, ["--seed", "1"])
