"""Demo-models stage: write the tiny FLUX.1 files and tokenizers that the pipeline uses by default."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fluxpipe.demo import write_demo_models

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoModelsConfig:
    out: Path
    seed: int = 0
    trained: bool = False  # the trained shapes-world DiT and AE (fluxpipe/demo_weights) instead of random ones


def run(cfg: DemoModelsConfig) -> dict[str, Path]:
    paths = write_demo_models(cfg.out, seed=cfg.seed, trained=cfg.trained)
    for name, path in paths.items():
        log.info("%s: %s", name, path)
    return paths
