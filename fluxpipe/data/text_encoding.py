"""Prompt encoding for FLUX.1: CLIP-L pooled vector and T5-XXL hidden states (spec §2.1-2.2).

CLIP: 77 tokens, padded with end-of-text, no attention mask, ``pooler_output`` [B, 768].
T5: ``max_length`` tokens (512 dev, 256 schnell), padded; the attention mask [B, L] goes to T5 only when
``apply_t5_attn_mask``; output ``last_hidden_state`` [B, L, 4096]. txt_ids are zeros [B, L, 3].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

CLIP_MAX_LENGTH = 77


def default_t5_max_length(variant: str) -> int:
    """The reference's default t5xxl_max_token_length: 512 for dev, 256 for schnell."""
    return 256 if variant == "schnell" else 512


@dataclass(frozen=True)
class PromptEmbeddings:
    pooled: Tensor  # [B, vec] CLIP-L pooled output
    t5: Tensor  # [B, L, ctx] T5 last hidden state
    mask: Tensor  # [B, L] int64, 1 = real token


def tokenize(clip_tok, t5_tok, prompts: list[str], max_length: int) -> tuple[Tensor | None, Tensor, Tensor]:  # noqa: ANN001
    """(clip ids [B, 77] or None without a CLIP tokenizer, t5 ids [B, L], t5 mask [B, L]) with padding to the
    full length and truncation."""
    t5 = t5_tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    if clip_tok is None:
        return None, t5.input_ids, t5.attention_mask
    return clip_ids(clip_tok, prompts), t5.input_ids, t5.attention_mask


def clip_ids(clip_tok, prompts: list[str]) -> Tensor:  # noqa: ANN001 - a transformers tokenizer
    """CLIP-L token ids [B, 77], padded to the full length and truncated."""
    ids: Tensor = clip_tok(
        prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    return ids


def clip_pooled(clip: nn.Module, clip_tok, prompts: list[str]) -> Tensor:  # noqa: ANN001
    """CLIP-L's pooled vectors [B, 768] of ``prompts`` on CLIP's device, in the caller's grad mode (a trained CLIP
    LoRA gets gradients)."""
    out: Tensor = clip(clip_ids(clip_tok, prompts).to(next(clip.parameters()).device)).pooler_output
    return out


@torch.no_grad()
def encode_prompts(
    clip: nn.Module | None,
    t5: nn.Module,
    clip_tok,  # noqa: ANN001 - a transformers tokenizer
    t5_tok,  # noqa: ANN001
    prompts: list[str],
    max_length: int,
    apply_t5_attn_mask: bool,
) -> PromptEmbeddings:
    """Encode ``prompts`` on the encoders' device; outputs stay there, in the encoders' dtype. Without CLIP-L
    (``clip`` None: Chroma) ``pooled`` is an empty [B, 0] tensor."""
    _, t5_ids, mask = tokenize(None, t5_tok, prompts, max_length)
    if clip is None:
        t5_param = next(t5.parameters())
        pooled = torch.zeros(len(prompts), 0, device=t5_param.device, dtype=t5_param.dtype)
    else:
        pooled = clip_pooled(clip, clip_tok, prompts)
    hidden = t5_hidden(t5, t5_ids, mask, apply_t5_attn_mask)
    return PromptEmbeddings(pooled=pooled, t5=hidden, mask=mask.to(torch.int64))


def t5_hidden(t5: nn.Module, ids: Tensor, mask: Tensor, apply_t5_attn_mask: bool) -> Tensor:
    """T5's last hidden state [B, L, ctx] of token ``ids`` [B, L] on T5's device (``mask`` [B, L] given to T5 only
    with ``apply_t5_attn_mask``). Keeps the caller's grad mode: a trained T5 LoRA (train_t5xxl) gets gradients."""
    device = next(t5.parameters()).device
    t5_mask = mask.to(device) if apply_t5_attn_mask else None
    out: Tensor = t5(ids.to(device), attention_mask=t5_mask).last_hidden_state
    return out
