"""Packing, unpacking and position ids against hand-written values (spec §4.1)."""

from __future__ import annotations

import pytest
import torch

from fluxpipe.maths.packing import image_ids, num_image_tokens, pack_latents, text_ids, unpack_latents


def test_pack_arange_by_hand() -> None:
    # x[0, c, h, w] = c*8 + h*4 + w for C=2, H=2, W=4 -> 1x2 tokens of 8 features (c, ph, pw)
    x = torch.arange(16.0).reshape(1, 2, 2, 4)
    packed = pack_latents(x)
    assert packed.shape == (1, 2, 8)
    assert packed[0].tolist() == [
        [0, 1, 4, 5, 8, 9, 12, 13],  # token (0, 0): columns 0-1
        [2, 3, 6, 7, 10, 11, 14, 15],  # token (0, 1): columns 2-3
    ]


def test_pack_16_channels_feature_index() -> None:
    # one 2x2 patch of 16 channels: value 100*c + 10*ph + pw must land at feature c*4 + ph*2 + pw
    x = torch.zeros(1, 16, 2, 2)
    for c in range(16):
        for ph in range(2):
            for pw in range(2):
                x[0, c, ph, pw] = 100 * c + 10 * ph + pw
    packed = pack_latents(x)
    assert packed.shape == (1, 1, 64)
    assert packed[0, 0, 4 * 7 + 2 * 1 + 0].item() == 710
    assert packed[0, 0, 63].item() == 1511


def test_round_trip_random() -> None:
    x = torch.randn(3, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    assert packed.shape == (3, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), x)


@pytest.mark.parametrize("shape", [(1, 16, 3, 4), (1, 16, 4, 5)])
def test_pack_rejects_odd_sizes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(shape))


def test_unpack_rejects_wrong_token_count() -> None:
    with pytest.raises(ValueError):
        unpack_latents(torch.zeros(1, 6, 64), 4, 4)


def test_image_ids_literal() -> None:
    ids = image_ids(2, 4, 6)  # latent 4x6 -> 2x3 tokens
    expected = [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]
    assert ids.shape == (2, 6, 3) and ids.dtype == torch.float32
    assert ids[0].tolist() == expected and ids[1].tolist() == expected


def test_image_ids_follow_packed_token_order() -> None:
    # channel 0 holds the token row, channel 1 the token column; the first features of tokens must match the ids
    h, w = 6, 8
    rows = torch.arange(h).div(2, rounding_mode="floor")[:, None].expand(h, w)
    cols = torch.arange(w).div(2, rounding_mode="floor")[None, :].expand(h, w)
    x = torch.stack([rows, cols]).float()[None]
    packed = pack_latents(x)
    ids = image_ids(1, h, w)
    assert torch.equal(packed[0, :, 0], ids[0, :, 1])
    assert torch.equal(packed[0, :, 4], ids[0, :, 2])


def test_text_ids_and_token_count() -> None:
    ids = text_ids(2, 5, dtype=torch.bfloat16)
    assert ids.shape == (2, 5, 3) and ids.dtype == torch.bfloat16 and not ids.any()
    assert num_image_tokens(128, 128) == 4096  # 1024² image
    with pytest.raises(ValueError):
        num_image_tokens(7, 8)
