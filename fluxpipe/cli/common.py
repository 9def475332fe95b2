"""What the `fluxpipe` commands share: the pipeline config a command reads, its model files, the compute dtype."""

from __future__ import annotations

import argparse
from pathlib import Path

from fluxpipe.errors import FluxpipeError


def pipeline(args: argparse.Namespace):  # noqa: ANN202 - PipelineConfig
    """The pipeline config: --config-json (the settings a Snakemake rule passes), else the --config files."""
    from fluxpipe.config.pipeline import load_pipeline, load_pipeline_file

    if getattr(args, "config_json", None) is not None:
        import json

        try:
            data = json.loads(args.config_json)
        except json.JSONDecodeError as e:
            raise FluxpipeError(f"--config-json: not valid JSON ({e})") from e
        return load_pipeline(data)
    return load_pipeline_file(*(args.config or [Path("config/config.yaml")]))


def add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    group = p.add_mutually_exclusive_group(required=required)
    group.add_argument(
        "--config",
        type=Path,
        action="append",
        help="config.yaml (repeatable, later wins)" + ("" if required else "; default config/config.yaml"),
    )
    group.add_argument("--config-json", help="the settings as one JSON object (what the Snakemake rules pass)")


def pipeline_models(args: argparse.Namespace):  # noqa: ANN202 - (PipelineConfig, ModelFiles, variant)
    """The pipeline config, its model files (the demo's when none is set) and the DiT's variant."""
    from fluxpipe.inference.sampler import ModelFiles
    from fluxpipe.io.checkpoints import inspect_checkpoint
    from fluxpipe.workflow import dit_slot, model_files, tokenizer_dirs

    cfg = pipeline(args)
    files, toks = model_files(cfg), tokenizer_dirs(cfg)
    if cfg.models.demo and not all(Path(f).is_file() for f in files.values()):
        rules = "demo_models demo_chroma" if cfg.chroma else "demo_models"
        raise FluxpipeError(
            f"{files['flux']}: the demo models are not there yet; run `snakemake --cores 1 "
            f"{rules}` (or set the model files in the config)"
        )
    models = ModelFiles(
        **{k: Path(v) for k, v in files.items() if k != "clip_l"},
        clip_l=Path(files["clip_l"]) if "clip_l" in files else None,  # (none for Chroma)
        **{k: Path(v) if v else None for k, v in toks.items()},  # type: ignore[arg-type] # (tokenizer folders)
    )
    return cfg, models, inspect_checkpoint(models.flux, dit_slot(cfg)).describe()["variant"]


def compute_dtype(device: str):  # noqa: ANN202
    import torch

    return torch.float32 if device == "cpu" else torch.bfloat16


# commands that compute with torch: they use the job's thread count (the others never import torch)
TORCH_COMMANDS = frozenset({"cache-latents", "cache-text", "train", "sample", "evaluate", "bench"})


def job_threads(env: dict[str, str]) -> int | None:
    """torch's threads for this process: the job's thread count (OMP_NUM_THREADS, which Snakemake sets from a
    rule's `threads:`), shared by the processes torchrun starts on this machine; None when it is not set."""
    try:
        threads = int(env.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    try:
        local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, threads // local) if threads > 0 else None


def use_job_threads(command: str) -> None:
    """torch.set_num_threads(the job's threads) for the commands that compute with torch."""
    import os

    threads = job_threads(dict(os.environ))
    if command in TORCH_COMMANDS and threads is not None:
        import torch

        torch.set_num_threads(threads)


class _DropNoise:
    """A logging filter: drops library lines that concern nothing fluxpipe uses."""

    # bitsandbytes on a CPU without the `kernels` package: its 4-bit CPU kernel (fluxpipe uses 8-bit optimizers)
    NOISE = ("pip install kernels",)

    def filter(self, record) -> bool:  # noqa: ANN001 - logging.LogRecord
        return not any(n in record.getMessage() for n in self.NOISE)


def quiet_library_noise() -> None:
    """Library noise off the terminal and the logs: bitsandbytes' "pip install kernels" line, the deprecation
    warnings that fluxpipe's own calls trigger, transformers' chatter."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropNoise())
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"fluxpipe(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"fluxpipe(\.|$)")


def accept_both_spellings(parser: argparse.ArgumentParser) -> None:
    """Each long flag of ``parser`` (and of its subcommands) also under its other spelling: --clip-l and
    --clip_l alike. The help shows the declared one only."""
    for action in list(parser._actions):
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                accept_both_spellings(sub)
            continue
        for flag in list(action.option_strings):
            if not flag.startswith("--"):
                continue
            name = flag[2:]
            for other in ("--" + name.replace("-", "_"), "--" + name.replace("_", "-")):
                parser._option_string_actions.setdefault(other, action)
