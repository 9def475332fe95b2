"""Uncached text (the reference without --cache_text_encoder_outputs): each step's captions are augmented and
encoded by CLIP-L and T5 on the training device.

A standalone ``fluxpipe train`` run without ``--cache_text_encoder_outputs`` trains this way (``LiveText`` in its
config). Each item's caption of a step is ``augment_caption(manifest caption, its subset's CaptionAugment,
caption_rng(seed, epoch, item), epoch=epoch, step=step, max_train_steps=total)``: the same draws as the cached
caption variants (``fluxpipe.data.captions.caption_slots``: slot v is epoch v's caption), so the two modes train on
the same strings in the epochs the variants cover; only token warm-up, which changes with the step, needs this
mode. The text cache is still built (the validation loss reads the validation rows' captions from it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxpipe.data.captions import CaptionAugment, augment_caption, caption_rng
from fluxpipe.data.epochs import TrainItem


@dataclass(frozen=True, kw_only=True, slots=True)
class LiveText:
    """The text encoders and the caption keys of every subset ([dataset][subset])."""

    t5xxl: Path
    clip_l: Path | None = None  # None: Chroma (no CLIP-L; the pooled vector is [B, 0])
    clip_tokenizer: Path | None = None
    t5_tokenizer: Path | None = None
    max_length: int = 512
    apply_t5_attn_mask: bool = False
    augments: tuple[tuple[CaptionAugment, ...], ...] = ()
    seed: int = 42


def step_captions(live: LiveText, items: Sequence[TrainItem], epoch: int, step: int, total: int) -> list[str]:
    """The captions of ``items`` at optimizer step ``step`` of epoch ``epoch`` (0-based)."""
    out = []
    for it in items:
        aug = live.augments[it.dataset][it.subset]
        rng = caption_rng(live.seed, epoch, it.caption_id)
        out.append(augment_caption(it.source_caption, aug, rng, epoch=epoch, step=step, max_train_steps=total))
    return out


class TextEncoders:
    """CLIP-L and T5 loaded once on ``device`` (in the frozen encoders' dtype), encoding a batch's captions.
    A T5 LoRA run (``train_t5xxl``) attaches its lora_te3 modules to ``t5`` and sets ``t5_in_loss``: ``__call__``
    then leaves T5 out and the loss calls ``encode_t5`` with gradients."""

    def __init__(self, live: LiveText, device: str) -> None:
        from fluxpipe.io.checkpoints import load_model
        from fluxpipe.models import text_encoders as te
        from fluxpipe.parallel.devices import encode_dtype

        self.live, dtype = live, encode_dtype(device)
        self.t5_in_loss = False  # True: a trained T5 LoRA; T5 runs inside the loss (encode_t5), not in __call__
        self.clip_tok: Any = te.load_clip_tokenizer(live.clip_tokenizer) if live.clip_l is not None else None
        self.t5_tok: Any = te.load_t5_tokenizer(live.t5_tokenizer, max_length=live.max_length)
        self.clip = load_model(live.clip_l, "clip_l", dtype=dtype, device=device) if live.clip_l else None
        self.t5 = load_model(live.t5xxl, "t5xxl", dtype=dtype, device=device)
        for model in (self.clip, self.t5):
            if model is not None:
                model.eval().requires_grad_(False)
        if self.clip is not None:
            te.check_vocab(self.clip_tok, te.embedding_rows(self.clip), "CLIP-L", "clip_tokenizer")
        te.check_vocab(self.t5_tok, te.embedding_rows(self.t5), "T5", "t5_tokenizer")

    def __call__(self, captions: list[str], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``pooled`` [B, 768], ``t5`` [B, L, 4096] in ``dtype`` and ``t5_mask`` [B, L] bool, as ``make_batch``'s
        (``pooled`` only with ``t5_in_loss``)."""
        from fluxpipe.data.text_encoding import clip_pooled, encode_prompts

        live = self.live
        if self.t5_in_loss:
            if self.clip is None:  # Chroma: no pooled vector
                return {"pooled": torch.zeros(len(captions), 0, device=device, dtype=dtype)}
            with torch.no_grad():
                pooled = clip_pooled(self.clip, self.clip_tok, captions)
            return {"pooled": pooled.to(device, dtype)}
        emb = encode_prompts(
            self.clip, self.t5, self.clip_tok, self.t5_tok, captions, live.max_length, live.apply_t5_attn_mask
        )
        return {
            "pooled": emb.pooled.to(device, dtype),
            "t5": emb.t5.to(device, dtype),
            "t5_mask": emb.mask.to(device).bool(),
        }

    def encode_t5(self, captions: list[str], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``t5`` [B, L, 4096] in ``dtype`` and ``t5_mask`` [B, L] bool of ``captions``, in the caller's grad mode
        (the training step's: gradients reach the T5 LoRA attached to ``self.t5``)."""
        from fluxpipe.data.text_encoding import t5_hidden, tokenize

        _, ids, mask = tokenize(None, self.t5_tok, captions, self.live.max_length)
        hidden = t5_hidden(self.t5, ids, mask, self.live.apply_t5_attn_mask)
        return {"t5": hidden.to(device, dtype), "t5_mask": mask.to(device).bool()}
