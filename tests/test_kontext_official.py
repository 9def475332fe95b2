"""FLUX.1 Kontext against the official BFL code: tests/data/kontext_official_case.safetensors was computed by BFL's
``prepare_kontext``, ``get_schedule`` and ``denoise`` (generator: tests/kontext_official/make_case.py, which says
what is stubbed). fluxpipe's own path — reference image → Kontext resolution → encode → tokens and ids, the
target's noise from the seed, the schedule, two Euler steps with the reference tokens — must give the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from fluxpipe.data.images import load_rgb
from fluxpipe.inference.sampler import encode_reference
from fluxpipe.maths.kontext import kontext_resolution, reference_tokens
from fluxpipe.maths.packing import image_ids, pack_latents
from fluxpipe.maths.sampling import denoise, get_noise, get_schedule
from fluxpipe.models import Flux, FluxParams

CASE = Path(__file__).parent / "data" / "kontext_official_case.safetensors"


def load_case() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(CASE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_kontext_sampling_equals_the_official_code(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    t, meta = load_case()
    dit = Flux(FluxParams(**json.loads(meta["params"]))).eval()
    dit.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("dit.")}, strict=True)
    ae = torch.nn.Conv2d(3, 16, kernel_size=8, stride=8)
    ae.load_state_dict({k[3:]: v for k, v in t.items() if k.startswith("ae.")}, strict=True)
    ae.encode = lambda x, sample=False: ae(x)  # the case's stand-in AE (make_case.py)
    path = tmp_path / "reference.png"
    Image.fromarray(t["pixels"].numpy()).save(path)
    image = load_rgb(path)
    assert kontext_resolution(*image.size) == (1248, 832)
    tokens, ids = reference_tokens(encode_reference(ae, image, kontext_resolution(*image.size), "cpu"))
    assert torch.equal(ids, t["ref_ids"].to(ids.dtype))
    assert torch.equal(tokens.to(torch.bfloat16), t["ref_tokens"])  # (the official code keeps them in bf16)
    width, height = json.loads(meta["target"])
    noise = get_noise(1, height, width, seed=int(meta["seed"]), device="cpu", dtype=torch.bfloat16)
    img = pack_latents(noise)
    assert torch.equal(img, t["noise"])
    img_ids = image_ids(1, noise.shape[2], noise.shape[3])
    assert torch.equal(img_ids, t["img_ids"].to(img_ids.dtype))
    timesteps = get_schedule(2, img.shape[1], shift=True)
    assert torch.allclose(torch.tensor(timesteps, dtype=torch.float64), t["timesteps"], atol=1e-6)
    with torch.no_grad():
        out = denoise(
            dit,
            img.float(),
            img_ids,
            t["txt"],
            torch.zeros(1, t["txt"].shape[1], 3),
            t["vec"],
            timesteps,
            float(meta["guidance"]),
            reference=(tokens.to(torch.bfloat16).float(), ids),
        )
        plain = denoise(
            dit,
            img.float(),
            img_ids,
            t["txt"],
            torch.zeros(1, t["txt"].shape[1], 3),
            t["vec"],
            timesteps,
            float(meta["guidance"]),
        )
    err = ((out - t["out"]).norm() / t["out"].norm()).item()
    assert err < 1e-5, err
    assert ((plain - t["out"]).norm() / t["out"].norm()).item() > 1e-2  # the reference tokens matter
