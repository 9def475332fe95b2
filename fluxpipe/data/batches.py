"""Training data from the caches: the items of a split, the reference's epoch order, and ready batches.

``load_items`` joins the manifest with the latent and text cache indexes into one ``TrainItem`` per
image (its latent entries, unflipped and, with ``flip_aug``, flipped; its text entry; bucket; flags).
The epoch order (``epoch_batches``) lives in ``fluxpipe.data.epochs``.
``CachedTensors`` reads entries from the memory-mapped safetensors shards (no pickle; each shard checked against
the sha256 its index recorded when first opened), and
``make_batch`` draws a fresh latent from each cached AE posterior, z = 0.3611·(mean + exp(logvar/2)·ε
− 0.1159), choosing the flipped entry with p = 0.5 for ``flip_aug`` items.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from torch import Tensor

from fluxpipe.data.captions import caption_sha256
from fluxpipe.data.epochs import TrainItem, batches_per_epoch, epoch_batches, epoch_repeats
from fluxpipe.errors import FluxpipeError, summarize
from fluxpipe.io.shards import DamagedShard, check_shard
from fluxpipe.io.tables import read_parquet
from fluxpipe.models.autoencoder import FLUX1_AE

__all__ = [
    "CachedTensors",
    "TrainItem",
    "batches_per_epoch",
    "epoch_batches",
    "epoch_captions",
    "epoch_repeats",
    "load_items",
    "make_batch",
]
# (item, flipped) -> this step's (mean, logvar, loss mask on the latent grid or None), or None for a cached item
FreshLatent = Callable[[TrainItem, bool], tuple[Tensor, Tensor, Tensor | None] | None]
RERUN = "the caches are older than the manifest: rerun the cache rules"


# ---- joining the manifest with the cache indexes ---------------------------------------------------------


def _latent_lookup(index: pd.DataFrame, kind: str = "") -> dict[tuple[str, tuple[int, int], bool], str]:
    """(image path, bucket (w, h), flip) -> latent key (identical files share a key, listed per path) of the
    entries of ``kind`` ("": the images; "reference": their Kontext references, listed under the targets' paths)."""
    out: dict[tuple[str, tuple[int, int], bool], str] = {}
    if index.empty or "path" not in index:
        return out
    index = index[index.kind.fillna("") == kind] if "kind" in index else (index if not kind else index.iloc[:0])
    for key, path, bucket, flip in zip(index.key, index.path, index.bucket, index.flip, strict=True):
        w, h = json.loads(bucket)
        out.setdefault((str(path), (int(w), int(h)), bool(flip)), str(key))
    return out


def _text_lookup(index: pd.DataFrame) -> dict[str, str]:
    """caption sha256 -> text key."""
    if index.empty or "caption_sha256" not in index:
        return {}
    return {str(sha): str(key) for key, sha in zip(index.key, index.caption_sha256, strict=True)}


def _mask_keys(r: Any, masks: dict[str, dict], bucket: tuple[int, int], flips: tuple[bool, ...]) -> list[str | None]:
    """A manifest row's loss-mask entries, one per flip ([] without a mask; None where one is missing)."""
    source = str(getattr(r, "mask_source", "") or "")
    return [masks[f"mask:{source}"].get((str(r.path), bucket, flip)) for flip in flips] if source else []


def _caption_variants(r: Any, texts: dict[str, str]) -> dict[str, Any] | None:
    """A manifest row's cached caption slots and empty caption (``epoch_captions``); None if one is not cached."""
    slots = json.loads(str(getattr(r, "caption_slots", "[]") or "[]"))
    drop_every = int(getattr(r, "caption_drop_every", 0) or 0)
    keys = [texts.get(caption_sha256(t)) for t in slots]
    empty = texts.get(caption_sha256("")) if drop_every else ""
    if None in keys or empty is None:
        return None
    pairs = tuple((str(k), t) for k, t in zip(keys, slots, strict=True))
    return {"text_variants": pairs, "drop_every": drop_every, "empty_text": str(empty)}


def _missing_error(kind: str, missing: list[str]) -> FluxpipeError:
    return FluxpipeError(f"{len(missing)} manifest rows have no {kind} cache entry ({summarize(missing, 3)}); {RERUN}")


def _item(
    row: object,
    r: Any,  # noqa: ANN401 - a manifest row (pandas namedtuple)
    keys: list,
    text_key: str,
    caption: str,
    ref_keys: list,
    mask_keys: list,
    variants: dict,
) -> TrainItem:
    """The TrainItem of one manifest row whose cache entries were all found."""
    return TrainItem(
        row=int(str(row)),
        dataset=int(r.dataset),
        latent_keys=tuple(str(k) for k in keys),
        text_key=text_key,
        bucket=(int(r.bucket_w), int(r.bucket_h)),
        is_reg=bool(r.is_reg),
        repeats=int(r.repeats),
        reference_keys=tuple(str(k) for k in ref_keys),
        mask_keys=tuple(str(k) for k in mask_keys),
        preserve=bool(getattr(r, "preserve", False)),
        caption=caption,
        subset=int(getattr(r, "subset", 0)),
        source_caption=str(r.caption),
        caption_id=f"{r.dataset}:{r.path}",
        image=str(r.path),
        resized=(int(r.resized_w), int(r.resized_h)),
        crop=(int(r.crop_left), int(r.crop_top)),
        interpolation=str(getattr(r, "resize_interpolation", "") or ""),
        size=(int(getattr(r, "width", 0)), int(getattr(r, "height", 0))),
        mask_source=str(getattr(r, "mask_source", "") or "") if mask_keys else "",
        conditioning=str(getattr(r, "conditioning", "") or ""),
        **variants,
    )


def load_items(
    manifest: Path, latent_index: Path, text_index: Path, split: str = "train", references: bool = False
) -> list[TrainItem]:
    """One ``TrainItem`` per manifest row of ``split``, in manifest order (empty if the split is); with
    ``references`` (Kontext) each also has its reference entries.

    Raises FluxpipeError naming the rows whose latent, reference or text entries are missing from the indexes.
    """
    table, _ = read_parquet(manifest)
    latent_table = read_parquet(latent_index)[0]
    latents = _latent_lookup(latent_table)
    refs = _latent_lookup(latent_table, "reference") if references else {}
    masks = {kind: _latent_lookup(latent_table, kind) for kind in ("mask:alpha", "mask:conditioning")}
    texts = _text_lookup(read_parquet(text_index)[0])
    items: list[TrainItem] = []
    no_latent: list[str] = []
    no_text: list[str] = []
    no_reference: list[str] = []
    for row, r in zip(table.index, table.itertuples(index=False), strict=True):
        if r.split != split:
            continue
        bucket = (int(r.bucket_w), int(r.bucket_h))
        flips = (False, True) if bool(r.flip_aug) else (False,)
        keys = [latents.get((str(r.path), bucket, flip)) for flip in flips]
        variants = _caption_variants(r, texts)  # (a row with cached caption slots starts on its first)
        slots = variants["text_variants"] if variants else ()
        text_key, caption = slots[0] if slots else (texts.get(str(r.caption_sha256)), str(r.caption))
        ref_keys = [refs.get((str(r.path), bucket, flip)) for flip in flips] if references else []
        mask_keys = _mask_keys(r, masks, bucket, flips)
        if None in ref_keys:
            no_reference.append(f"{r.path} at {bucket[0]}x{bucket[1]}")
            continue
        if any(k is None for k in keys + mask_keys):
            no_latent.append(f"{r.path} at {bucket[0]}x{bucket[1]}")
        if text_key is None or variants is None:
            no_text.append(f"{r.path} (caption {str(r.caption_sha256)[:12]} or one of its cached variants)")
        if None in keys or None in mask_keys or text_key is None or variants is None:
            continue
        items.append(_item(row, r, keys, str(text_key), caption, ref_keys, mask_keys, variants))
    _raise_missing(no_reference, no_latent, no_text)
    return items


def _raise_missing(no_reference: list[str], no_latent: list[str], no_text: list[str]) -> None:
    if no_reference:
        raise FluxpipeError(
            f"{len(no_reference)} manifest rows have no Kontext reference latent "
            f"({summarize(no_reference, 3)}): Kontext training needs conditioning_data_dir (the "
            "reference images, same stem as their targets) in every subset, and the latent cache "
            "built for Kontext (train model_type: kontext); rerun the cache rules"
        )
    if no_latent:
        raise _missing_error("latent", no_latent)
    if no_text:
        raise _missing_error("text", no_text)


# ---- reading cache entries ----------------------------------------------------------------------------------


class CachedTensors:
    """Cache entries by key, read from the shard files named in the two indexes.

    Each shard is opened once with ``safe_open`` (memory-mapped, no pickle) and kept open until ``close``;
    a tensor is read only when asked for. Usable as a context manager.
    """

    def __init__(self, latent_index: Path, text_index: Path) -> None:
        self._where: dict[str, Path] = {}
        self._sha256: dict[Path, str] = {}  # shard -> the sha256 its index recorded (checked when first opened)
        for index in (Path(latent_index), Path(text_index)):
            table, _ = read_parquet(index)
            if table.empty:
                continue
            if "shard_sha256" not in table:
                raise FluxpipeError(
                    f"{index}: records no shard sha256 (written by an older fluxpipe); rerun the "
                    "cache rules (snakemake rebuilds them: their format version changed)"
                )
            shards = [index.parent / str(s) for s in table.shard]
            self._where.update(zip((str(k) for k in table.key), shards, strict=True))
            self._sha256.update(zip(shards, (str(d) for d in table.shard_sha256), strict=True))
        self._open: dict[Path, Any] = {}
        self._names: dict[Path, set[str]] = {}

    def _get(self, key: str, part: str) -> Tensor:
        path = self._where.get(key)
        if path is None:
            raise FluxpipeError(f"cache entry {key} is in neither index; {RERUN}")
        if path not in self._open:
            self._check(path)
            handle = safe_open(str(path), framework="pt")
            self._open[path], self._names[path] = handle, set(handle.keys())
        name = f"{key}.{part}"
        if name not in self._names[path]:
            raise FluxpipeError(f"{path}: has no tensor {name}; {RERUN}")
        return self._open[path].get_tensor(name)

    def _check(self, path: Path) -> None:
        """The shard's bytes must be those its index was built from (one streamed read per shard)."""
        try:
            if check_shard(path) == self._sha256[path]:
                return
            problem = f"{path}: is not the shard its index was built from"
        except DamagedShard as e:
            problem = str(e)
        raise FluxpipeError(
            f"{problem}; delete it (rm {path}) and rerun the same snakemake command: it rebuilds "
            "that shard, the index and this run"
        )

    def latent(self, key: str) -> tuple[Tensor, Tensor]:
        """(mean, logvar), each [16, H/8, W/8]: the AE posterior before FLUX's scale and shift."""
        return self._get(key, "mean"), self._get(key, "logvar")

    def mask(self, key: str) -> Tensor:
        """[H/8, W/8] loss mask in [0, 1] on the latent grid."""
        return self._get(key, "mask")

    def text(self, key: str) -> tuple[Tensor, Tensor, Tensor]:
        """(pooled [768], t5 [L, 4096], mask [L] uint8 with 1 = real token)."""
        return self._get(key, "pooled"), self._get(key, "t5"), self._get(key, "mask")

    def close(self) -> None:
        self._open.clear()  # safe_open handles release their mapping when dropped
        self._names.clear()

    def __enter__(self) -> CachedTensors:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


# ---- batches ------------------------------------------------------------------------------------------------


def _draw(kind: str, shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> Tensor:
    """float32 U[0,1) or N(0,1) drawn on the generator's device, then moved to ``device``."""
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def make_batch(
    items: Sequence[TrainItem],
    indices: Sequence[int],
    tensors: CachedTensors,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype,
    prior_loss_weight: float = 1.0,
    fresh: FreshLatent | None = None,
) -> dict[str, Any]:
    """Tensors ready for the DiT for the items at ``indices`` (all in one bucket).

    Draws from ``generator``, in this order: u = rand(B) (a ``flip_aug`` item uses its flipped entry when
    u < 0.5; drawn for every item so the draws do not depend on the flags), then ε = randn(B, C, H/8, W/8);
    both float32 on the generator's device. Returns ``latents`` [B, 16, H/8, W/8] = 0.3611·(mean +
    exp(logvar/2)·ε − 0.1159) computed in float32 on ``device`` and cast to ``dtype``; ``pooled`` [B, 768]
    and ``t5`` [B, L, 4096] in ``dtype``; ``t5_mask`` [B, L] bool; ``is_reg`` and ``flipped`` [B] bool;
    ``indices`` (list of int); for Kontext items ``reference`` (``reference_latents``); ``loss_weights`` [B]
    float32 (``prior_loss_weight`` for regularisation items, else 1); ``loss_mask`` [B, H/8, W/8] float32 when
    an item has a cached loss mask (flipped with its latent; items without one get ones, as the reference), else
    None; ``preserve`` [B] bool (differential output preservation). ``fresh(item, flipped)``: the item's (mean,
    logvar, loss mask or None) encoded this step (uncached latents; the mask cut with the image's crop), or None
    for its cached entries.
    """
    chosen = [items[i] for i in indices]
    assert chosen, "make_batch needs at least one item"
    assert len({it.bucket for it in chosen}) == 1, f"a batch mixes buckets: {sorted({it.bucket for it in chosen})}"
    u = _draw("rand", (len(chosen),), generator, "cpu")
    flipped = [len(it.latent_keys) > 1 and bool(u[b] < 0.5) for b, it in enumerate(chosen)]
    encoded = [fresh(it, f) if fresh else None for it, f in zip(chosen, flipped, strict=True)]
    moments = [
        (e[0], e[1]) if e is not None else tensors.latent(it.latent_keys[1 if f else 0])
        for it, f, e in zip(chosen, flipped, encoded, strict=True)
    ]
    mean = torch.stack([m for m, _ in moments]).to(device, torch.float32)
    logvar = torch.stack([lv for _, lv in moments]).to(device, torch.float32)
    eps = _draw("randn", tuple(mean.shape), generator, device)
    latents = FLUX1_AE.scale_factor * (mean + torch.exp(0.5 * logvar) * eps - FLUX1_AE.shift_factor)
    texts = [tensors.text(it.text_key) for it in chosen]
    refs = {"reference": reference_latents(chosen, flipped, tensors, device, dtype)} if chosen[0].reference_keys else {}
    return {
        **refs,
        "latents": latents.to(dtype),
        "pooled": torch.stack([p for p, _, _ in texts]).to(device, dtype),
        "t5": torch.stack([t for _, t, _ in texts]).to(device, dtype),
        "t5_mask": torch.stack([m for _, _, m in texts]).to(device).bool(),
        "is_reg": torch.tensor([it.is_reg for it in chosen], dtype=torch.bool, device=device),
        "flipped": torch.tensor(flipped, dtype=torch.bool, device=device),
        "indices": list(indices),
        "loss_weights": torch.tensor(
            [prior_loss_weight if it.is_reg else 1.0 for it in chosen], dtype=torch.float32, device=device
        ),
        "loss_mask": loss_masks(
            chosen, flipped, tensors, tuple(mean.shape[2:]), device, [e[2] if e is not None else None for e in encoded]
        ),
        "preserve": torch.tensor([it.preserve for it in chosen], dtype=torch.bool, device=device),
    }


def loss_masks(
    chosen: Sequence[TrainItem],
    flipped: Sequence[bool],
    tensors: CachedTensors,
    size: tuple[int, ...],
    device: torch.device | str,
    fresh: Sequence[Tensor | None] = (),
) -> Tensor | None:
    """[B, h, w] float32 loss masks of the items: ``fresh[b]`` (cut with this step's crop) where given, else the
    cached mask (ones for an item without one); None if no item has one."""
    if not any(it.mask_keys for it in chosen):
        return None
    given = list(fresh) or [None] * len(chosen)
    masks = [
        m.float()
        if m is not None
        else (tensors.mask(it.mask_keys[1 if f else 0]).float() if it.mask_keys else torch.ones(size))
        for it, f, m in zip(chosen, flipped, given, strict=True)
    ]
    return torch.stack(masks).to(device)


def refuse_preservation(items: Sequence[TrainItem], trainer: str) -> None:
    """Differential output preservation is the LoRA trainer's (a LoRA at multiplier 0 gives the base model)."""
    if any(it.preserve for it in items):
        raise FluxpipeError(
            f"custom_attributes diff_output_preservation: the {trainer} has no base model beside the trained "
            "weights (the reference supports it for LoRA training only); remove it from the dataset config"
        )


def epoch_captions(items: Sequence[TrainItem], epoch: int) -> list[TrainItem]:
    """The items with the text entry they train on in ``epoch`` (0-based): the empty caption in the
    caption_dropout_every_n_epochs epochs (counted from 1, as the reference), else cached slot epoch mod n
    (``fluxpipe.data.captions.caption_slots``); items without slots are returned unchanged."""
    out = []
    for it in items:
        if it.drop_every and (epoch + 1) % it.drop_every == 0:
            out.append(dataclasses.replace(it, text_key=it.empty_text, caption=""))
        elif it.text_variants:
            key, text = it.text_variants[epoch % len(it.text_variants)]
            out.append(dataclasses.replace(it, text_key=key, caption=text))
        else:
            out.append(it)
    return out


def reference_latents(
    chosen: Sequence[TrainItem],
    flipped: Sequence[bool],
    tensors: CachedTensors,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Tensor:
    """Kontext reference latents [B, 16, H/8, W/8]: 0.3611·(mean − 0.1159) of each item's cached reference
    posterior (its mode: no draw, so the target's random stream is unchanged), flipped with its target."""
    means = [tensors.latent(it.reference_keys[1 if f else 0])[0] for it, f in zip(chosen, flipped, strict=True)]
    mean = torch.stack(means).to(device, torch.float32)
    return (FLUX1_AE.scale_factor * (mean - FLUX1_AE.shift_factor)).to(dtype)
