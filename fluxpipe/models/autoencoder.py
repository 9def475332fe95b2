"""The FLUX.1 autoencoder (``AutoEncoder``, ``AutoEncoderParams``) with the official names.

``ae.safetensors`` loads strictly into this tree (spec §1.5). ``encoder(x)`` returns the moments
[B, 2*z, H/8, W/8] (mean | log-variance); ``encode`` samples (or takes the mean) and normalises
with ``scale_factor * (z - shift_factor)``; ``decode`` inverts that and runs the decoder.
Images are in [-1, 1].
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn


@dataclass
class AutoEncoderParams:
    resolution: int
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: list[int]
    num_res_blocks: int
    z_channels: int
    scale_factor: float
    shift_factor: float


FLUX1_AE = AutoEncoderParams(
    resolution=256,
    in_channels=3,
    ch=128,
    out_ch=3,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)


def tiny_ae() -> AutoEncoderParams:
    """Same structure (4 levels, 16 latent channels, factor 8) with 32 base channels and 1 block per level."""
    return AutoEncoderParams(**{**FLUX1_AE.__dict__, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1})


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = _norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c").contiguous() for f in (self.q, self.k, self.v))
        h = nn.functional.scaled_dot_product_attention(q, k, v)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width, c=c, b=b)
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv without padding."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level as in the official tree: the ``block`` list, an (always empty) ``attn`` list and,
    but at the last level, a ``downsample`` (encoder) or ``upsample`` (decoder) run after the blocks."""

    def __init__(
        self, blocks: list[ResnetBlock], downsample: Downsample | None = None, upsample: Upsample | None = None
    ):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()
        if downsample is not None:
            self.downsample = downsample
        if upsample is not None:
            self.upsample = upsample

    def forward(self, h: Tensor) -> Tensor:
        for block in self.block:
            h = block(h)
        for resample in ("downsample", "upsample"):
            module = self._modules.get(resample)
            if module is not None:
                h = module(h)
        return h


class Mid(nn.Module):
    """The middle of the encoder and the decoder: ResNet block, attention, ResNet block."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(
        self, resolution: int, in_channels: int, ch: int, ch_mult: list[int], num_res_blocks: int, z_channels: int
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[i_level], ch * mult
            blocks = [ResnetBlock(block_in if i == 0 else block_out, block_out) for i in range(num_res_blocks)]
            block_in = block_out
            last = i_level == self.num_resolutions - 1
            self.down.append(Level(blocks, downsample=None if last else Downsample(block_in)))
        self.mid = Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self,
        ch: int,
        out_ch: int,
        ch_mult: list[int],
        num_res_blocks: int,
        in_channels: int,
        resolution: int,
        z_channels: int,
    ):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = Mid(block_in)
        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            blocks = [ResnetBlock(block_in if i == 0 else block_out, block_out) for i in range(num_res_blocks + 1)]
            block_in = block_out
            levels.insert(0, Level(blocks, upsample=Upsample(block_in) if i_level != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        h = h.to(next(self.up.parameters()).dtype)
        for i_level in reversed(range(self.num_resolutions)):
            h = self.up[i_level](h)
        return self.conv_out(swish(self.norm_out(h)))


class DiagonalGaussian(nn.Module):
    """Moments (mean | logvar along dim 1) -> a sample mean + exp(logvar/2)*eps, or the mean."""

    def __init__(self, sample: bool = True, chunk_dim: int = 1):
        super().__init__()
        self.sample = sample
        self.chunk_dim = chunk_dim

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mean, logvar = torch.chunk(z, 2, dim=self.chunk_dim)
        if not self.sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(0.5 * logvar) * noise


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(
            params.resolution, params.in_channels, params.ch, params.ch_mult, params.num_res_blocks, params.z_channels
        )
        self.decoder = Decoder(
            params.ch,
            params.out_ch,
            params.ch_mult,
            params.num_res_blocks,
            params.in_channels,
            params.resolution,
            params.z_channels,
        )
        self.reg = DiagonalGaussian()
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def normalize(self, z_raw: Tensor) -> Tensor:
        return self.scale_factor * (z_raw - self.shift_factor)

    def encode(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised latents [B, z, H/8, W/8] (sampled, or the mean)."""
        moments = self.encoder(x)
        z = self.reg(moments, generator) if sample else torch.chunk(moments, 2, dim=1)[0]
        return self.normalize(z)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))


def infer_ae_params(shapes: dict[str, tuple[int, ...]]) -> AutoEncoderParams:
    """AutoEncoderParams from a BFL-layout AE's key -> shape map (scale/shift are FLUX.1's; not in the file)."""
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = []
    for i in levels:
        out = shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]
        if out % ch:
            raise ValueError(f"encoder level {i} has {out} channels, not a multiple of {ch}")
        ch_mult.append(out // ch)
    n_blocks = len({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    return AutoEncoderParams(
        resolution=FLUX1_AE.resolution,
        in_channels=in_channels,
        ch=ch,
        out_ch=shapes["decoder.conv_out.weight"][0],
        ch_mult=ch_mult,
        num_res_blocks=n_blocks,
        z_channels=shapes["decoder.conv_in.weight"][1],
        scale_factor=FLUX1_AE.scale_factor,
        shift_factor=FLUX1_AE.shift_factor,
    )
