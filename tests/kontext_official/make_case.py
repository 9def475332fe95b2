"""Generator of tests/data/kontext_official_case.safetensors: a tiny FLUX.1 Kontext case computed by the official
BFL code (github.com/black-forest-labs/flux, commit 802fb47, ``src/``), for tests/test_kontext_official.py.

What the official functions compute here: ``prepare_kontext`` (reference image resized with Lanczos to the preferred
Kontext resolution nearest its aspect ratio, encoded, packed into tokens with ids (1, row, col); the target's noise
from the seed), ``get_schedule`` (shifted by the target's token count) and ``denoise`` (reference tokens appended to
the sequence at every step, the prediction sliced back), with a tiny random ``Flux``. The AE is replaced by one
seeded 8x8/stride-8 convolution (3 -> 16 channels): the case tests the Kontext layout, not the AE (which the shared
conformance cases cover), and keeps the 1248x832 reference encode cheap. Text encoders: fixed tensors.

Run once, with the official code checked out somewhere (its own dependencies beyond torch/einops/PIL are stubbed):
    python tests/kontext_official/make_case.py --bfl-src /path/to/flux/src --out tests/data/kontext_official_case.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

PARAMS = dict(
    in_channels=64,
    out_channels=64,
    vec_in_dim=8,
    context_in_dim=16,
    hidden_size=32,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[4, 6, 6],
    theta=10_000,
    qkv_bias=True,
    guidance_embed=True,
)
TARGET = (32, 48)  # width, height of the edited image (its noise: 16 x 6 x 4 latent, 6 tokens)
IMAGE = (60, 40)  # width, height of the reference image (aspect 1.5 -> 1248 x 832: 78 x 52 = 4056 tokens)
SEED, STEPS, GUIDANCE, TXT_LEN = 7, 2, 2.5, 5


def import_official(src: Path):  # noqa: ANN201 - the official modules
    """flux.model and flux.sampling from ``src``, with modules they import but this case never uses stubbed."""
    for name in ("cv2", "imwatermark"):
        stub = types.ModuleType(name)
        stub.WatermarkEncoder = type("WatermarkEncoder", (), {"set_watermark": lambda *a: None})  # (the CLI's)
        sys.modules.setdefault(name, stub)
    sys.path.insert(0, str(src))
    import flux.model as model
    import flux.sampling as sampling

    return model, sampling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bfl-src", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model_mod, sampling = import_official(args.bfl_src)
    torch.manual_seed(0)
    dit = model_mod.Flux(model_mod.FluxParams(**PARAMS)).float().eval()
    for p in dit.parameters():  # (some official layers start at zero: give every weight a value)
        torch.nn.init.normal_(p, std=0.2)
    ae = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8)
    torch.nn.init.normal_(ae.weight, std=0.05)
    pixels = torch.randint(
        0, 256, (IMAGE[1], IMAGE[0], 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    txt = torch.randn(1, TXT_LEN, PARAMS["context_in_dim"], generator=torch.Generator().manual_seed(2))
    vec = torch.randn(1, PARAMS["vec_in_dim"], generator=torch.Generator().manual_seed(3))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.png"
        Image.fromarray(pixels.numpy()).save(path)
        inp, height, width = sampling.prepare_kontext(
            t5=lambda prompt: txt,
            clip=lambda prompt: vec,
            prompt="edit it",
            ae=types.SimpleNamespace(encode=ae),
            img_cond_path=str(path),
            seed=SEED,
            device=torch.device("cpu"),
            target_width=TARGET[0],
            target_height=TARGET[1],
        )
    timesteps = sampling.get_schedule(STEPS, inp["img"].shape[1], shift=True)
    with torch.no_grad():
        out = sampling.denoise(
            dit,
            img=inp["img"].float(),
            img_ids=inp["img_ids"],
            txt=inp["txt"],
            txt_ids=inp["txt_ids"],
            vec=inp["vec"],
            timesteps=timesteps,
            guidance=GUIDANCE,
            img_cond_seq=inp["img_cond_seq"].float(),
            img_cond_seq_ids=inp["img_cond_seq_ids"],
        )
    tensors = {f"dit.{k}": v.contiguous() for k, v in dit.state_dict().items()}
    tensors |= {f"ae.{k}": v.contiguous() for k, v in ae.state_dict().items()}
    tensors |= {
        "pixels": pixels,
        "txt": txt,
        "vec": vec,
        "noise": inp["img"],
        "img_ids": inp["img_ids"],
        "ref_tokens": inp["img_cond_seq"],
        "ref_ids": inp["img_cond_seq_ids"],
        "out": out,
        "timesteps": torch.tensor(timesteps, dtype=torch.float64),
    }
    meta = {
        "params": json.dumps(PARAMS),
        "target": json.dumps([width, height]),
        "seed": str(SEED),
        "guidance": str(GUIDANCE),
        "source": "black-forest-labs/flux 802fb47 src/flux/sampling.py",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(args.out), meta)
    print(
        f"{args.out}: {out.shape[1]} target tokens, {inp['img_cond_seq'].shape[1]} reference tokens; "
        f"{np.prod(out.shape)} outputs"
    )


if __name__ == "__main__":
    main()
