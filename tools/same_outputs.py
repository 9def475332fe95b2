"""Train the demo LoRA, full fine-tune and ControlNet with fixed flags at this checkout (random seed-0 demo
models, config/demo/dataset.toml) and print each output's tensor sha256 (keys and bytes; metadata left out, since
the engine fixed the ss_* figures on purpose). Run it in two checkouts to compare revisions:

    cd <checkout> && PYTHONPATH=$PWD python <this file>
"""

import hashlib
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from fluxpipe.cli import main

torch.set_num_threads(1)
try:
    from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR, write_demo_models
except ImportError:
    from fluxpipe.demo import CLIP_DIR, FILES, T5_DIR, write_demo_models

repo = Path.cwd()
tmp = Path(tempfile.mkdtemp())
demo = tmp / "demo"
write_demo_models(demo)


def m(k: str) -> str:
    return str(demo / FILES[k])


base = [
    "--pretrained_model_name_or_path",
    m("flux"),
    "--clip_l",
    m("clip_l"),
    "--t5xxl",
    m("t5xxl"),
    "--ae",
    m("ae"),
    "--dataset_config",
    str(repo / "config/demo/dataset.toml"),
    "--clip_tokenizer",
    str(demo / CLIP_DIR),
    "--t5_tokenizer",
    str(demo / T5_DIR),
    "--cache_latents",
    "--cache_text_encoder_outputs",
]
runs = {
    "lora": [
        "--output_name",
        "l",
        "--network_module",
        "networks.lora_flux",
        "--network_dim",
        "16",
        "--network_alpha",
        "1",
        "--learning_rate",
        "1e-4",
        "--optimizer_type",
        "AdamW8bit",
        "--lr_scheduler",
        "constant",
        "--max_train_epochs",
        "2",
        "--mixed_precision",
        "fp16",
        "--gradient_checkpointing",
        "--guidance_scale",
        "1.0",
        "--timestep_sampling",
        "flux_shift",
        "--model_prediction_type",
        "raw",
    ],
    "full": [
        "--output_name",
        "f",
        "--seed",
        "42",
        "--gradient_checkpointing",
        "--mixed_precision",
        "bf16",
        "--save_precision",
        "bf16",
        "--optimizer_type",
        "adafactor",
        "--optimizer_args",
        "relative_step=False",
        "scale_parameter=False",
        "warmup_init=False",
        "--fused_backward_pass",
        "--full_bf16",
        "--lr_scheduler",
        "constant_with_warmup",
        "--learning_rate",
        "1e-4",
        "--max_grad_norm",
        "0.0",
        "--max_train_epochs",
        "2",
        "--timestep_sampling",
        "shift",
        "--discrete_flow_shift",
        "3.1582",
        "--model_prediction_type",
        "raw",
        "--guidance_scale",
        "1.0",
    ],
    "controlnet": [
        "--output_name",
        "c",
        "--learning_rate",
        "1e-3",
        "--optimizer_type",
        "AdamW",
        "--max_train_epochs",
        "2",
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
    ],
}
for method, flags in runs.items():
    out = tmp / method
    assert main(["train", method, *base, "--output_dir", str(out), *flags]) == 0, method
    (final,) = [p for p in out.glob("*.safetensors") if "-" not in p.stem]
    t = load_file(str(final))
    h = hashlib.sha256()
    for k in sorted(t):
        h.update(k.encode())
        h.update(t[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t[k].numel() else b"")
    print(f"RESULT {method} {final.name} tensors={len(t)} sha256={h.hexdigest()}")
