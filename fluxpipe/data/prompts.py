"""The reference trainer's ``--sample_prompts`` file (.txt, .toml or .json) as a list of ``SamplePrompt``.

``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped. Options follow the prompt, split
on `` --``: ``--w`` width, ``--h`` height, ``--d`` seed, ``--s`` steps, ``--g`` FLUX guidance, ``--l`` true-CFG scale,
``--n`` negative prompt, ``--cn`` control image (option names ignore case, as in the reference).
``.toml``: a ``[prompt]`` table whose keys are defaults for every ``[[prompt.subset]]`` entry, one entry a prompt.
``.json``: a list whose items are objects or strings; a string is parsed like a .txt line (options included).
Tables use the reference's names: prompt, negative_prompt, width, height, seed, sample_steps, guidance_scale, scale,
controlnet_image; a JSON null means "unset". ``--ss --ctr --rcfg --fs`` (and their table names sample_sampler,
cfg_trunc_ratio, renorm_cfg, flow_shift) are accepted but unused for FLUX: one warning names them.
All formats give the same settings: width/height floored to a multiple of 16 (at least 64), steps clamped to 1..1000,
the control image resolved against the prompt file's folder (not checked here). Anything else raises
``FluxpipeError`` naming the file, the line or entry, and how to fix it. Nothing is evaluated.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxpipe.errors import FluxpipeError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class SamplePrompt:
    """One sample image to render while training; width, height and steps are normalised on creation."""

    index: int
    """Position in the file (0-based, counting prompts only); names the sample image."""
    prompt: str
    negative_prompt: str = ""
    """Used only when cfg_scale != 1."""
    width: int = 512
    """Floored to a multiple of 16, at least 64."""
    height: int = 512
    """Floored to a multiple of 16, at least 64."""
    seed: int | None = None
    """None: the caller picks one."""
    steps: int = 20
    """Clamped to 1..1000."""
    guidance: float = 3.5
    """FLUX embedded guidance (--g / guidance_scale)."""
    cfg_scale: float = 1.0
    """True CFG scale (--l / scale)."""
    control_image: Path | None = None
    """ControlNet conditioning image (--cn / controlnet_image), relative to the prompt file's folder."""
    reference_image: Path | None = None
    """FLUX.1 Kontext reference image (fluxpipe's own: `fluxpipe sample --reference-image`, evaluate.reference_image)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "width", max(64, self.width - self.width % 16))
        object.__setattr__(self, "height", max(64, self.height - self.height % 16))
        object.__setattr__(self, "steps", min(1000, max(1, self.steps)))


KEYS: dict[str, tuple[str, type, str]] = {  # table key -> (SamplePrompt field, type, what a valid value looks like)
    "prompt": ("prompt", str, "the prompt text"),
    "negative_prompt": ("negative_prompt", str, "text"),
    "width": ("width", int, "a whole number of pixels such as 1024"),
    "height": ("height", int, "a whole number of pixels such as 1024"),
    "seed": ("seed", int, "a whole number >= 0 such as 42"),
    "sample_steps": ("steps", int, "a whole number of steps such as 20"),
    "guidance_scale": ("guidance", float, "a finite number such as 3.5"),
    "scale": ("cfg_scale", float, "a finite number such as 1.0 (1 turns true CFG off)"),
    "controlnet_image": ("control_image", str, "an image path, relative to the prompt file's folder"),
}
TXT_OPTIONS = {
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "sample_steps",
    "g": "guidance_scale",
    "l": "scale",
    "n": "negative_prompt",
    "cn": "controlnet_image",
}
UNUSED_KEYS = ("sample_sampler", "cfg_trunc_ratio", "renorm_cfg", "flow_shift")  # the reference's; not used for FLUX
UNUSED_OPTIONS = ("ss", "ctr", "rcfg", "fs")

Parsed = tuple[list[SamplePrompt], set[str]]  # the prompts and the unused options/keys met


def load_prompts(path: Path) -> list[SamplePrompt]:
    """Read a .txt, .toml or .json sample prompt file; raise FluxpipeError naming the file when it cannot be used."""
    path = Path(path)
    readers = {".txt": _read_txt, ".toml": _read_toml, ".json": _read_json}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise FluxpipeError(
            f"{path}: sample prompt files must end in .txt, .toml or .json, not {path.suffix!r}; "
            "rename the file or convert it to one of these formats"
        )
    prompts, unused = reader(_read_text(path), path)
    if not prompts:
        raise FluxpipeError(
            f"{path}: the file holds no prompts; add a prompt line (.txt), a [[prompt.subset]] "
            "entry (.toml) or a list item (.json)"
        )
    _warn_unused(unused, str(path))
    return prompts


def parse_prompt_line(line: str, index: int, base: Path) -> SamplePrompt:
    """One .txt line (prompt, then ``--option value`` pairs) as prompt number ``index``; paths relative to ``base``."""
    prompt, unused = _parse_line(line, index, Path(base), f"sample prompt {index}")
    _warn_unused(unused, f"sample prompt {index}")
    return prompt


def _warn_unused(unused: set[str], where: str) -> None:
    if unused:
        log.warning("%s: %s ignored (not used when sampling FLUX)", where, ", ".join(sorted(unused)))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FluxpipeError(f"{path}: sample prompt file not found; check the sample_prompts path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FluxpipeError(
            f"{path}: cannot read the sample prompt file ({error}); give a readable UTF-8 text file"
        ) from None


def _read_txt(text: str, path: Path) -> Parsed:
    prompts: list[SamplePrompt] = []
    unused: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            prompt, found = _parse_line(line, len(prompts), path.parent, f"{path}: line {number}")
            prompts.append(prompt)
            unused |= found
    return prompts, unused


def _parse_line(line: str, index: int, base: Path, where: str) -> tuple[SamplePrompt, set[str]]:
    """Split on ' --' like the reference; the first part is the prompt, each other part 'name value'."""
    head, *options = (" " + line.strip()).split(" --")
    values: dict[str, Any] = {"prompt": head.strip()}
    unused: set[str] = set()
    for option in options:
        parts = option.split(maxsplit=1)
        if not parts:  # a stray ' --'
            continue
        name, value = parts[0].lower(), parts[1].strip() if len(parts) > 1 else ""
        if name in UNUSED_OPTIONS:
            unused.add(f"--{name}")
            continue
        key = TXT_OPTIONS.get(name)
        if key is None:
            known = " ".join(f"--{n}" for n in (*TXT_OPTIONS, *UNUSED_OPTIONS))
            raise FluxpipeError(
                f"{where}: unknown option --{name}; use one of {known} (text after ' --' is always read as an option)"
            )
        if not value:
            raise FluxpipeError(f"{where}: option --{name} has no value; write it as --{name} VALUE")
        values[key] = _check(key, _from_text(key, value, f"--{name}", where), f"--{name}", where)
    return _build(values, index, base, where), unused


def _from_text(key: str, value: str, label: str, where: str) -> Any:
    kind = KEYS[key][1]
    try:
        return value if kind is str else kind(value)
    except ValueError:
        raise FluxpipeError(f"{where}: {label} must be {KEYS[key][2]}, not {value!r}") from None


def _check(key: str, value: Any, label: str, where: str) -> Any:
    """The value as its field's type; bools, non-finite numbers, negative seeds and blank paths fail."""
    kind, hint = KEYS[key][1:]
    if kind is float and type(value) is int:
        value = float(value)
    bad = type(value) is not kind
    bad = bad or (kind is float and not math.isfinite(value)) or (key == "seed" and value < 0)
    bad = bad or (key == "controlnet_image" and not value.strip())
    if bad:
        raise FluxpipeError(f"{where}: {label} must be {hint}, not {value!r}")
    return value


def _build(values: Mapping[str, Any], index: int, base: Path, where: str) -> SamplePrompt:
    fields = {KEYS[key][0]: value for key, value in values.items()}
    fields["prompt"] = fields.get("prompt", "").strip()
    if not fields["prompt"]:
        raise FluxpipeError(
            f"{where}: the prompt is empty; write the prompt text (in a .txt line, before any "
            '--option; in a table, as prompt = "...")'
        )
    if "negative_prompt" in fields:
        fields["negative_prompt"] = fields["negative_prompt"].strip()
    if "control_image" in fields:
        fields["control_image"] = base / Path(fields["control_image"].strip()).expanduser()
    return SamplePrompt(index=index, **fields)


def _check_table(table: Mapping[str, Any], where: str) -> tuple[dict[str, Any], set[str]]:
    """A TOML/JSON table's known keys, type-checked (None = unset), and the unused keys it names."""
    values: dict[str, Any] = {}
    unused: set[str] = set()
    for key, value in table.items():
        if key in UNUSED_KEYS:
            unused.add(key)
        elif key not in KEYS:
            close = difflib.get_close_matches(key, [*KEYS, *UNUSED_KEYS], n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise FluxpipeError(f"{where}: unknown key {key!r}; {hint}the keys are {', '.join(KEYS)}")
        elif value is not None:
            values[key] = _check(key, value, key, where)
    return values, unused


def _read_toml(text: str, path: Path) -> Parsed:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise FluxpipeError(f"{path}: not valid TOML ({error}); fix the syntax") from None
    table = data.get("prompt")
    extra = sorted(set(data) - {"prompt"})
    if not isinstance(table, dict) or extra:
        listed = f"; found {', '.join(extra)}" if extra else ""
        raise FluxpipeError(
            f"{path}: expected only a [prompt] table of defaults with [[prompt.subset]] entries{listed}"
        )
    subsets = table.get("subset", [])
    if not isinstance(subsets, list) or not all(isinstance(s, dict) for s in subsets):
        raise FluxpipeError(f"{path}: prompt.subset must be a list of tables; write each prompt as [[prompt.subset]]")
    defaults, unused = _check_table({k: v for k, v in table.items() if k != "subset"}, f"{path}: [prompt]")
    prompts = []
    for i, subset in enumerate(subsets):
        where = f"{path}: prompt.subset[{i}]"
        values, found = _check_table(subset, where)
        prompts.append(_build({**defaults, **values}, i, path.parent, where))
        unused |= found
    return prompts, unused


def _read_json(text: str, path: Path) -> Parsed:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise FluxpipeError(f"{path}: not valid JSON ({error}); fix the syntax") from None
    if not isinstance(data, list):
        raise FluxpipeError(
            f"{path}: the top level must be a list of prompts (strings or objects), not {type(data).__name__}"
        )
    prompts, unused = [], set()
    for i, item in enumerate(data):
        where = f"{path}: item {i}"
        if isinstance(item, str):
            prompt, found = _parse_line(item, i, path.parent, where)
        elif isinstance(item, dict):
            values, found = _check_table(item, where)
            prompt = _build(values, i, path.parent, where)
        else:
            raise FluxpipeError(
                f'{where}: must be a prompt string or an object with a "prompt" key, not {type(item).__name__}'
            )
        prompts.append(prompt)
        unused |= found
    return prompts, unused
