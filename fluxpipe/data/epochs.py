"""Training items and the reference's epoch order (spec §3.2).

``TrainItem`` is one manifest image with the cache entries it trains on. ``epoch_batches`` gives the reference's
per-epoch order: every item ``repeats`` times (regularization items rebalanced so they match the training
images, as the reference does), grouped by (dataset, bucket), each group shuffled and cut into batches of
``batch_size`` (last partial batch kept), and the batches shuffled; one ``random.Random`` seeded by (seed, epoch)
makes the order a pure function of (items, seed, epoch), so a resumed run skips the first k batches of an epoch
exactly.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fluxpipe.io.tables import read_parquet


@dataclass(frozen=True)
class TrainItem:
    """One manifest image of the split, with the cache entries it trains on."""

    row: int  # row index in the manifest table
    dataset: int
    latent_keys: tuple[str, ...]  # (unflipped,) or, with flip_aug, (unflipped, flipped)
    text_key: str
    bucket: tuple[int, int]  # (width, height) in pixels
    is_reg: bool
    repeats: int
    reference_keys: tuple[str, ...] = ()  # Kontext: the reference latent entries, one per latent key (flip)
    mask_keys: tuple[str, ...] = ()  # alpha_mask / masked_loss: the loss-mask entries, one per latent key (flip)
    caption: str = ""  # the caption text_key encodes (the CLIP-L LoRA re-encodes it)
    text_variants: tuple[tuple[str, str], ...] = ()  # (key, caption) per cached caption slot (epoch e: e mod n)
    drop_every: int = 0  # caption_dropout_every_n_epochs: those epochs train on empty_text
    empty_text: str = ""  # the key of the empty caption
    preserve: bool = False  # custom_attributes diff_output_preservation: the target is the base model's output
    subset: int = 0
    source_caption: str = ""  # the manifest's caption, before augmentation (uncached text augments it each step)
    caption_id: str = ""  # "dataset:path": the item in caption_rng(seed, epoch, item)
    image: str = ""  # the image file and its manifest plan (uncached latents encode it each step)
    resized: tuple[int, int] = (0, 0)
    crop: tuple[int, int] = (0, 0)
    interpolation: str = ""
    size: tuple[int, int] = (0, 0)  # the image's (W, H) as stored (a face crop scales it itself)
    mask_source: str = ""  # "alpha" / "conditioning": where a loss mask cut each step comes from ("": none)
    conditioning: str = ""  # the conditioning image (its R channel is the mask with --masked_loss)


# ---- the epoch order ----------------------------------------------------------------------------------------


def epoch_repeats(items: Sequence[TrainItem]) -> list[int]:
    """Times each item is seen per epoch: its ``repeats``, except regularization items, rebalanced per
    dataset as the reference does (DreamBoothDataset): walking the reg items in order, each takes its own
    repeats until the reg count reaches the dataset's training count (later reg items are left out, 0), then
    one more each, round-robin, until it does. Without training images a dataset's reg items are unused."""
    counts = [0 if it.is_reg else it.repeats for it in items]
    for dataset in sorted({it.dataset for it in items}):
        target = sum(it.repeats for it in items if it.dataset == dataset and not it.is_reg)
        regs = [i for i, it in enumerate(items) if it.dataset == dataset and it.is_reg]
        n, first = 0, True
        while regs and n < target:
            for i in regs:
                step = items[i].repeats if first else 1
                counts[i] += step
                n += step
                if n >= target:
                    break
            first = False
    return counts


def _batch_size(batch_size: int | Mapping[int, int], dataset: int) -> int:
    size = batch_size if isinstance(batch_size, int) else batch_size.get(dataset)
    if size is None or size < 1:
        raise ValueError(f"dataset {dataset}: batch size must be an int >= 1, got {size!r}")
    return size


def batches_per_epoch(manifest: Path, batch_size: int | Mapping[int, int]) -> int:
    """How many batches an epoch of the manifest's training split has (the same count in every epoch), from the
    manifest alone: what the workflow needs to plan a run's segments before the caches exist."""
    table, _ = read_parquet(manifest)
    items = [
        TrainItem(
            row=int(row),
            dataset=int(r.dataset),
            latent_keys=(),
            text_key="",
            bucket=(int(r.bucket_w), int(r.bucket_h)),
            is_reg=bool(r.is_reg),
            repeats=int(r.repeats),
        )
        for row, r in zip(table.index, table.itertuples(index=False), strict=True)
        if r.split == "train"
    ]
    return len(epoch_batches(items, batch_size, 0, 0))


def epoch_batches(
    items: Sequence[TrainItem], batch_size: int | Mapping[int, int], epoch: int, seed: int
) -> list[list[int]]:
    """The epoch's batches as lists of indices into ``items`` (spec §3.2), a pure function of its arguments.

    Groups: (dataset, bucket), each holding every item ``epoch_repeats`` times in item order. With one
    ``random.Random`` seeded by (seed, epoch), in the reference's order of draws: the list of (group, batch
    number) is shuffled, then each group's contents (groups in sorted order); batch j of a group is its
    slice [j·bs, (j+1)·bs), the last one partial. ``batch_size`` is one int or {dataset index: int}.
    The reference also reshuffles batches across datasets (its DataLoader's shuffle=True); the single
    shuffle of all batches here does the same. Not bit-identical to the reference's order (other RNG seed).
    """
    groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
    for i, (item, count) in enumerate(zip(items, epoch_repeats(items), strict=True)):
        groups.setdefault((item.dataset, item.bucket), []).extend([i] * count)
    order = sorted(k for k, v in groups.items() if v)
    sizes = {k: _batch_size(batch_size, k[0]) for k in order}
    slots = [(k, j) for k in order for j in range(-(-len(groups[k]) // sizes[k]))]
    rng = random.Random(f"fluxpipe.epoch_batches:{int(seed)}:{int(epoch)}")  # str seed: sha512, stable
    rng.shuffle(slots)
    for k in order:
        rng.shuffle(groups[k])
    return [groups[k][j * sizes[k] : (j + 1) * sizes[k]] for k, j in slots]
