"""Text-encoder cache stage: CLIP-L pooled vector and T5-XXL hidden states of every distinct caption.

One shard job per text shard; captions are assigned by a stable hash of their text, and identical
captions are encoded once. Each entry is keyed by (caption sha256, CLIP and T5 file sha256, tokenizer
hashes, t5xxl_max_token_length, apply_t5_attn_mask, dtypes, format version) and holds ``pooled`` [768],
``t5`` [L, 4096] (bf16 unless configured) and ``mask`` [L] (uint8, 1 = real token).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pandas as pd
import torch
from torch import nn

from fluxpipe.io.progress import progress
from fluxpipe.data.captions import text_entries
from fluxpipe.data.text_encoding import CLIP_MAX_LENGTH, encode_prompts
from fluxpipe.io.checkpoints import load_model
from fluxpipe.io.hashing import cached_sha256, tokenizer_identity
from fluxpipe.io.shards import ShardStats, build_shard, content_key
from fluxpipe.io.tables import read_parquet
from fluxpipe.models import text_encoders as te
from fluxpipe.parallel.devices import encode_dtype

log = logging.getLogger(__name__)
TEXT_CACHE_VERSION = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheTextConfig:
    manifest: Path
    clip_l: Path | None  # None: no CLIP-L (Chroma); entries hold an empty ``pooled`` [0]
    t5xxl: Path
    clip_tokenizer: Path | None
    t5_tokenizer: Path | None
    out: Path
    shard: int
    max_length: int
    apply_t5_attn_mask: bool = False
    batch_size: int = 8
    dtype: str = "bfloat16"
    device: str = "cpu"
    hash_cache: Path | None = None
    compile: str = "auto"  # torch.compile T5: "auto" (CUDA and >= COMPILE_MIN captions), "true", "false"


COMPILE_MIN = 5000  # measured on an H200: compiling T5-XXL costs ~45 s and lifts 49 -> 82 prompts/s


def text_identity(cfg: CacheTextConfig) -> dict[str, object]:
    """Everything besides the caption that determines an entry."""
    return {
        "v": TEXT_CACHE_VERSION,
        "clip": cached_sha256(cfg.clip_l, cfg.hash_cache)[0] if cfg.clip_l is not None else None,
        "t5": cached_sha256(cfg.t5xxl, cfg.hash_cache)[0],
        "clip_tok": tokenizer_identity(cfg.clip_tokenizer, te.CLIP_HUB_ID, cfg.hash_cache) if cfg.clip_l else None,
        "t5_tok": tokenizer_identity(cfg.t5_tokenizer, te.T5_HUB_ID, cfg.hash_cache),
        "max_length": cfg.max_length,
        "mask": cfg.apply_t5_attn_mask,
        "encode": str(encode_dtype(cfg.device)),
        "store": cfg.dtype,
    }


def warn_truncated(captions: dict[str, str], clip_tok, t5_tok, max_length: int) -> None:  # noqa: ANN001
    """One warning per caption longer than CLIP's 77 or T5's ``max_length`` tokens (special tokens included):
    the encoders see only the first tokens, as in the reference, but the user is told."""
    texts = list(dict.fromkeys(captions.values()))
    if not texts:
        return
    clip_counts = [len(ids) for ids in clip_tok(texts, truncation=False).input_ids] if clip_tok else [0] * len(texts)
    t5_counts = [len(ids) for ids in t5_tok(texts, truncation=False).input_ids]
    for text, n_clip, n_t5 in zip(texts, clip_counts, t5_counts, strict=True):
        cut = [
            f"{n} {name} tokens, only the first {limit} are used"
            for n, name, limit in ((n_clip, "CLIP", CLIP_MAX_LENGTH), (n_t5, "T5", max_length))
            if n > limit
        ]
        if cut:
            log.warning(
                "caption %r is %s (shorten it to keep its end)",
                text[:60] + ("..." if len(text) > 60 else ""),
                "; ".join(cut),
            )


@torch.no_grad()
def encode(captions: dict[str, str], cfg: CacheTextConfig) -> dict[str, dict[str, torch.Tensor]]:
    """key -> {pooled, t5, mask} for ``captions`` (key -> caption text)."""
    if not captions:
        return {}
    dtype = encode_dtype(cfg.device)
    # tokenizers first: a missing tokenizer fails before models load
    clip_tok = te.load_clip_tokenizer(cfg.clip_tokenizer) if cfg.clip_l is not None else None
    t5_tok = te.load_t5_tokenizer(cfg.t5_tokenizer, max_length=cfg.max_length)
    clip = load_model(cfg.clip_l, "clip_l", dtype=dtype, device=cfg.device) if cfg.clip_l is not None else None
    t5 = load_model(cfg.t5xxl, "t5xxl", dtype=dtype, device=cfg.device)
    if clip is not None:
        te.check_vocab(clip_tok, te.embedding_rows(clip), "CLIP-L", "clip_tokenizer")
    te.check_vocab(t5_tok, te.embedding_rows(t5), "T5", "t5_tokenizer")
    warn_truncated(captions, clip_tok, t5_tok, cfg.max_length)
    if cfg.compile == "true" or (
        cfg.compile == "auto" and cfg.device.startswith("cuda") and len(captions) >= COMPILE_MIN
    ):
        t5 = cast(nn.Module, torch.compile(t5))  # an OptimizedModule (torch's stub says a plain callable)
    store = getattr(torch, cfg.dtype)
    keys = list(captions)
    out: dict[str, dict[str, torch.Tensor]] = {}
    with progress(total=len(keys), desc=f"text shard {cfg.shard}", unit="caption", mininterval=2) as bar:
        for i in range(0, len(keys), cfg.batch_size):
            batch = keys[i : i + cfg.batch_size]
            emb = encode_prompts(
                clip, t5, clip_tok, t5_tok, [captions[k] for k in batch], cfg.max_length, cfg.apply_t5_attn_mask
            )
            for j, key in enumerate(batch):
                out[key] = {
                    "pooled": emb.pooled[j].float().cpu().to(store).clone(),
                    "t5": emb.t5[j].float().cpu().to(store).clone(),
                    "mask": emb.mask[j].to(torch.uint8).clone(),
                }
            bar.update(len(batch))
    return out


def shard_captions(table: pd.DataFrame, shard: int) -> list[tuple[str, str]]:
    """(sha256, text) of every distinct caption of the text shard: each row's ``text_captions`` (its cached
    caption slots, the empty caption for every-n-epochs dropout), or its one caption (manifests without them)."""
    if "text_captions" not in table:
        rows = table[table.text_shard == shard].drop_duplicates("caption_sha256")
        return list(zip(rows.caption_sha256, rows.caption, strict=True))
    found = {sha: text for column in table.text_captions for sha, s, text in text_entries(column) if s == shard}
    return sorted(found.items())


def run(cfg: CacheTextConfig) -> ShardStats:
    """Build one text shard: reuse what exists, encode the rest, write atomically."""
    start = time.perf_counter()
    table, _ = read_parquet(cfg.manifest)
    identity = text_identity(cfg)
    entries = {content_key(caption=sha, **identity): (sha, text) for sha, text in shard_captions(table, cfg.shard)}
    info = {k: {"caption_sha256": sha} for k, (sha, _) in entries.items()}
    stats = build_shard(cfg.out, info, lambda keys: encode({k: entries[k][1] for k in keys}, cfg))
    log.info(
        "text shard %d: %d captions, %d encoded (%.1f/s), %d reused, %d dropped, %.1f s",
        cfg.shard,
        len(entries),
        stats.encoded,
        stats.encoded / max(stats.seconds, 1e-9),
        stats.reused,
        stats.dropped,
        time.perf_counter() - start,
    )
    return stats
