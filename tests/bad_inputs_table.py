"""Write docs/bad-inputs.md from the messages tests/test_bad_inputs.py sees (real runs, nothing typed by hand).

python tests/bad_inputs_table.py        # runs those tests once with FLUXPIPE_BAD_INPUTS set
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAD = """# Bad inputs and what fluxpipe says

Every bad input below was tried in a real run (`tests/test_bad_inputs.py`); the message is the line the user
sees, copied from that run by `python tests/bad_inputs_table.py` (`<tmp>/` is the test's temporary folder).
Errors (`fluxpipe: error: ...`) stop with exit status 2 before any model loads or cache is built; warnings
(`WARNING`) are logged and the run goes on. Decisions (issue 15, items 3-5):

- An empty or whitespace-only caption file stops the manifest, as the reference's "caption file is empty"
  (a *missing* caption file still falls back to `class_tokens`).
- Images with a side under **64 px** are warned about (they are upscaled to their bucket); files of image types
  the reference does not train on (`.gif .tif .tiff .avif .jxl .heic .heif .ico .tga .jp2 .ppm`) are listed.
- Captions longer than CLIP's 77 or T5's `t5xxl_max_token_length` tokens (special tokens counted) are cut as in
  the reference, with one warning per distinct caption in the cache-text log (once per cache build, not per epoch).
- `--learning_rate` (and `--unet_lr`, `--text_encoder_lr`) below 0 is refused. A rate of 0 drops its parameter
  group (as in the reference); when *every* group would be 0 the run is refused, for every optimizer
  (D-Adaptation and Prodigy multiply their step by the lr too, so lr 0 trains nothing there either).
- `--optimizer_args` are checked against the optimizer's constructor when the flags are parsed: unknown names,
  tuples of the wrong length and values of the wrong type (number / True-False) are refused.
- Non-UTF-8 file names are refused, all listed, rather than carried with surrogate escapes (Parquet, JSON and
  Snakemake's lock files cannot store them).
- The output folder is locked by an exclusive flock on `<output_dir>/.<output_name>.lock` (JSON inside: pid, host,
  start time), removed when the run ends; the kernel drops the flock of a killed run (kill -9, wall time), so its
  leftover file is taken over with a warning. Under torchrun rank 0 holds it.
- Tokenizers: without `clip_tokenizer:` / `t5_tokenizer:` the hub ids are used only if the local hub cache holds
  the tokenizer file or the hub answers one connection attempt (no retries); every tokenizer's size must fit its
  encoder's embedding rows (`rows - min(128, rows // 8) <= tokens <= rows`; CLIP-L 49408/49408, T5 32100/32128).
- Tested in their own files (their exact lines are asserted there): a `--masked_loss` mask of another size
  than its image (`tests/test_loss_weighting.py`): `fluxpipe: error: 1 bad dataset files: <tmp>/masks/a.png:
  the --masked_loss mask is 32x32 but its image <tmp>/img/a.png is 64x64; give the mask its image's size; ...`;
  a Chroma file given as FLUX and the reverse (`tests/test_chroma.py`): `fluxpipe: error: <file>: is a FLUX.1
  DiT (flux1-dev/flux1-schnell.safetensors), but was loaded as a Chroma DiT (Chroma1-Base.safetensors); use
  --model_type flux`; LyCORIS not installed (`tests/test_lycoris.py`): `fluxpipe: error: --network_module
  lycoris.kohya: needs the package lycoris-lora, which is not installed: pip install 'fluxpipe[lycoris]' (or
  lycoris-lora)`; a T5 LoRA with cached text (`tests/test_uncached_text.py`): `fluxpipe: error: --network_args
  train_t5xxl=True with --cache_text_encoder_outputs: a T5 LoRA needs T5 to run every step; turn off
  cache_text_encoder_outputs (the reference refuses this too)`; a T5 LoRA without text-encoder training
  (`tests/test_t5_lora.py`): `fluxpipe: error: --network_args train_t5xxl=True with --network_train_unet_only:
  the reference then drops the T5 LoRA modules and trains no T5 LoRA; drop one of the two`; a Chroma pipeline
  with a training section it cannot run (`tests/test_chroma_pipeline.py`): `fluxpipe: error: train_full:
  train.model_type chroma: only LoRA training supports Chroma; leave train_full empty (`train_full:` with no
  value)` (and one line each for `models.clip_l` set, `cache.apply_t5_attn_mask: false`, a `train:` without
  the T5 mask or with guidance other than 0; a FLUX.1 file as the Chroma DiT stops `validate_models` with the
  line above). Each exits with
  status 2.

| bad input | what the user sees |
|---|---|
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "messages.jsonl"
        env = {**os.environ, "FLUXPIPE_BAD_INPUTS": str(out)}
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "tests/test_bad_inputs.py"], cwd=REPO, env=env, check=True
        )
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    seen: dict[str, str] = {}
    for row in rows:  # the tests' temporary folders shortened to <tmp>/
        seen.setdefault(row["case"], re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/]+/", "<tmp>/", row["message"]))
    bar = "\\|"  # a | inside a table cell
    lines = [f"| {case} | `` {message.replace('|', bar)} `` |" for case, message in seen.items()]
    (REPO / "docs/bad-inputs.md").write_text(HEAD + "\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
