"""Validate stage: check the four model files (and tokenizers) before anything downstream runs.

Input: paths of the DiT, AE, CLIP-L and T5-XXL files, optional tokenizer folders. Output: a JSON report
(variant dev/schnell, size class, dtypes, parameter counts, sha256, keys that are deliberately ignored).
The sha256 and a NaN/Inf count of every float tensor come from one streamed read, cached together by file
identity (fluxpipe.io.hashing); a file with any NaN/Inf value is refused, naming the tensors. Every file is checked from its header against a meta-device model, strictly;
the widths that connect the models (CLIP -> vector_in, T5 -> txt_in, AE latents -> img_in) must agree.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fluxpipe import __version__
from fluxpipe.errors import CheckpointError, FluxpipeError, summarize
from fluxpipe.io.atomic import write_text_atomic
from fluxpipe.io.checkpoints import ModelSpec, dit_slot, inspect_checkpoint
from fluxpipe.io.hashing import HashCache, tokenizer_identity
from fluxpipe.models.chroma import ChromaParams
from fluxpipe.models.flux import FluxParams
from fluxpipe.models import text_encoders as te

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class ValidateConfig:
    flux: Path | None = None
    ae: Path | None = None
    clip_l: Path | None = None
    t5xxl: Path | None = None
    clip_tokenizer: Path | None = None
    t5_tokenizer: Path | None = None
    out: Path | None = None
    hash_cache: Path | None = None
    model_type: str = "flux"  # "chroma": the DiT file (``flux``) is checked as a Chroma DiT

    def files(self) -> dict[str, Path]:
        """slot -> path of the given files (the DiT under its model type's slot: flux or chroma)."""
        if self.model_type == "chroma" and self.clip_l is not None:
            raise FluxpipeError(f"--clip-l {self.clip_l}: Chroma uses no CLIP-L text encoder; leave --clip-l out")
        slots = {"flux": dit_slot(self.model_type), "ae": "ae", "clip_l": "clip_l", "t5xxl": "t5xxl"}
        return {slot: getattr(self, f) for f, slot in slots.items() if getattr(self, f) is not None}


def _inspect_all(files: dict[str, Path]) -> dict[str, ModelSpec]:
    specs, errors = {}, []
    for slot, path in files.items():
        try:
            specs[slot] = inspect_checkpoint(path, slot)
        except FluxpipeError as e:
            errors.append(str(e))
    if len(errors) == 1:
        raise FluxpipeError(errors[0])
    if errors:
        raise FluxpipeError(f"{len(errors)} model files are unusable: " + " | ".join(errors))
    return specs


def check_widths(specs: dict[str, ModelSpec]) -> None:
    """The files must fit together: CLIP width = vec_in_dim, T5 width = context_in_dim, AE z*4 = in_channels."""
    flux = specs.get("flux") or specs.get("chroma")
    if flux is None:
        return
    params = flux.params
    assert isinstance(params, FluxParams | ChromaParams)  # the flux and chroma slots hold DiT params
    checks = []
    if "clip_l" in specs and isinstance(params, FluxParams):  # (Chroma has no CLIP-L input)
        checks.append(("clip_l", specs["clip_l"].width, "vec_in_dim", params.vec_in_dim))
    if "t5xxl" in specs:
        checks.append(("t5xxl", specs["t5xxl"].width, "context_in_dim", params.context_in_dim))
    if "ae" in specs:
        checks.append(("ae", specs["ae"].width, "in_channels", params.in_channels))
    for slot, width, field, expected in checks:
        if width != expected and not (field == "in_channels" and expected == 384):
            raise FluxpipeError(
                f"{specs[slot].header.path} gives width {width}, but the DiT "
                f"{flux.header.path} expects {field}={expected}: the files belong to different models"
            )


def _tokenizer_report(cfg: ValidateConfig, specs: dict[str, ModelSpec]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, loader, slot in (
        ("clip_tokenizer", te.load_clip_tokenizer, "clip_l"),
        ("t5_tokenizer", te.load_t5_tokenizer, "t5xxl"),
    ):
        folder = getattr(cfg, key)
        if folder is None:
            continue
        tok = loader(folder)
        rows = specs[slot].vocab_size if slot in specs else None
        if rows is not None:
            te.check_vocab(tok, rows, "CLIP-L" if slot == "clip_l" else "T5", key)
        out[key] = {
            "path": str(folder),
            "vocab_size": len(tok),
            "sha256": tokenizer_identity(Path(folder), "", cfg.hash_cache),
        }
    return out


def scan_file(hashes: HashCache, spec: ModelSpec) -> tuple[str, bool]:
    """(sha256, from the cache) of a model file; CheckpointError when a float tensor holds NaN or Inf."""
    header = spec.header
    tensors = {k: (t.dtype, *t.offsets) for k, t in header.tensors.items()}
    digest, nonfinite, cached = hashes.scan(header.path, header.data_start, tensors)
    if nonfinite:
        named = [f"{k} ({n} values)" for k, n in nonfinite.items()]
        raise CheckpointError(
            f"{header.path}: {len(nonfinite)} tensors hold NaN/Inf values: {summarize(named, 4)}; "
            "the file is damaged or was saved from a diverged run: download or export it again"
        )
    return digest, cached


def run(cfg: ValidateConfig) -> dict[str, object]:
    """Validate the given files; write and return the report. Raises FluxpipeError on any bad input."""
    files = cfg.files()
    if not files:
        raise FluxpipeError("nothing to validate: pass at least one of --flux, --ae, --clip-l, --t5xxl")
    start = time.perf_counter()
    specs = _inspect_all(files)
    check_widths(specs)
    models: dict[str, dict[str, object]] = {}
    report: dict[str, object] = {"fluxpipe_version": __version__, "models": models}
    hashes = HashCache(cfg.hash_cache)
    scans = {slot: scan_file(hashes, spec) for slot, spec in specs.items()}
    hashes.save()
    for slot, spec in specs.items():
        digest, cached = scans[slot]
        models[slot] = {
            "path": str(spec.header.path),
            "bytes": spec.header.path.stat().st_size,
            "sha256": digest,
            "parameters": spec.num_parameters,
            "dtypes": spec.dtypes(),
            **spec.describe(),
            "ignored_keys": list(spec.ignored),
        }
        log.info(
            "%s: %s, %s parameters, %s, sha256 %s%s",
            slot,
            spec.header.path,
            f"{spec.num_parameters:,}",
            spec.dtypes(),
            digest[:12],
            " (cached)" if cached else "",
        )
    for slot in ("flux", "chroma"):
        if slot in specs:
            report["variant"] = models[slot]["variant"]
    report["tokenizers"] = _tokenizer_report(cfg, specs)
    report["seconds"] = round(time.perf_counter() - start, 3)
    if cfg.out is not None:
        write_text_atomic(cfg.out, json.dumps(report, indent=2) + "\n")
    return report
