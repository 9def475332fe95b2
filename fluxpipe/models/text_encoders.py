"""CLIP-L and T5-XXL, the FLUX.1 text encoders, through transformers built from config (no hub download).

Single-file layouts (spec §1.6): ``clip_l.safetensors`` holds ``text_model.*`` keys (transformers 5's
``CLIPTextModel`` has no ``text_model.`` level, so the prefix is mapped here); ``t5xxl_*.safetensors`` holds
``shared.weight`` and/or ``encoder.embed_tokens.weight`` (one tied tensor) plus ``encoder.*``.
Configs are inferred from key shapes, so the official files and the tiny demo files use one code path.
Tokenizers come from a local folder, else the hub ids when online, else a clear error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fluxpipe.errors import FluxpipeError

if TYPE_CHECKING:  # transformers is imported where it is used: it costs seconds, and many stages never need it
    from torch import nn
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

CLIP_FILE_PREFIX = "text_model."
# keys some clip_l.safetensors files carry that FLUX does not use (projection head, logit scale, a buffer)
CLIP_IGNORED_KEYS = frozenset({"text_projection.weight", "logit_scale", "text_model.embeddings.position_ids"})
T5_TIED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")

CLIP_HUB_ID = "openai/clip-vit-large-patch14"
T5_HUB_ID = "google/t5-v1_1-xxl"


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    return len({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def clip_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], eos_token_id: int | None = None) -> CLIPTextConfig:
    """CLIPTextConfig for a ``text_model.*`` state dict (CLIP-L: 49408 x 768, 12 layers, 12 heads of 64).

    FLUX's CLIP-L uses quick_gelu. The pooled output is the hidden state at the first end-of-text token,
    which is the last id of the vocabulary for CLIP's BPE (and for fluxpipe's demo tokenizer).
    """
    from transformers import CLIPTextConfig

    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    if hidden % 64:
        raise ValueError(f"CLIP hidden size {hidden} is not a multiple of the head dim 64")
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_count(shapes, r"text_model\.encoder\.layers\.(\d+)\."),
        num_attention_heads=hidden // 64,
        max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=768,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1 if eos_token_id is None else eos_token_id,
        pad_token_id=vocab - 1,
    )


def t5_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> T5Config:
    """T5Config (encoder only, gated GELU, no biases) for a T5 v1.1 state dict (XXL: d_model 4096, 64 heads)."""
    from transformers import T5Config

    embed_key = next(k for k in T5_TIED_KEYS if k in shapes)
    vocab, d_model = shapes[embed_key]
    num_buckets, num_heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=_count(shapes, r"encoder\.block\.(\d+)\."),
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )


def build_clip(config: CLIPTextConfig) -> CLIPTextModel:
    from transformers import CLIPTextModel

    config._attn_implementation = "sdpa"
    return CLIPTextModel(config)


def build_t5(config: T5Config) -> T5EncoderModel:
    from transformers import T5EncoderModel

    config._attn_implementation = "sdpa"
    return T5EncoderModel(config)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub endpoint (no retries): transformers would retry for minutes when offline."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _hub_or_error(kind: str, hub_id: str, setting: str, loader, needed: str):  # noqa: ANN001 - from_pretrained
    """The tokenizer of ``hub_id`` from the local hub cache, else from the hub when it answers, else one error at
    once naming the setting (no network retries). The cache is asked for ``needed`` itself: transformers 5 given
    a hub id that is not cached with local_files_only builds an empty tokenizer instead of raising."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(hub_id, needed)
    if isinstance(cached, str):
        return loader(str(Path(cached).parent), local_files_only=True)
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        reason = "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    elif not _hub_reachable():
        reason = "offline: the hub does not answer and it is not in the local hub cache"
    else:
        try:
            return loader(hub_id, local_files_only=False)
        except Exception as e:  # missing repo, network error: all mean "not available here"
            reason = f"{type(e).__name__}"
    raise FluxpipeError(
        f"{kind} tokenizer not available ({reason}): set `{setting}:` in config/config.yaml (or --{setting}) "
        f"to a local folder holding the files of {hub_id}"
    )


def embedding_rows(model: nn.Module) -> int:
    """Rows of a text encoder's token embedding (what its tokenizer's vocabulary must fit)."""
    from torch import nn
    from transformers import PreTrainedModel  # loaded already: it built the model

    embedding = model.get_input_embeddings() if isinstance(model, PreTrainedModel) else None
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"{type(model).__name__} is not a text encoder with a token embedding")
    return embedding.num_embeddings


def check_vocab(tokenizer, rows: int, what: str, setting: str) -> None:  # noqa: ANN001 - a transformers tokenizer
    """Refuse a tokenizer whose vocabulary does not fit the encoder's embedding rows: more tokens than rows, or
    clearly fewer (an empty tokenizer, e.g. transformers 5 built from a missing file, would encode every caption
    as unknown tokens). Rows may exceed the vocabulary by padding (T5: 32100 tokens, 32128 rows)."""
    size = len(tokenizer)
    if size > rows or size < rows - min(128, rows // 8):
        raise FluxpipeError(
            f"{what} tokenizer has {size} tokens but its encoder embeds {rows}: the tokenizer "
            f"(`{setting}:` / --{setting}) does not belong to the encoder file, or its folder is "
            "incomplete; point it at the encoder's own tokenizer folder"
        )


def load_clip_tokenizer(folder: str | Path | None, max_length: int = 77, rows: int | None = None):
    """CLIP ViT-L/14 BPE tokenizer from ``folder`` (vocab.json + merges.txt), else the hub id when cached or online;
    with ``rows`` (the encoder's embedding rows) its vocabulary is checked against the encoder."""
    from transformers import CLIPTokenizer

    def load(src: str, local_files_only: bool = True):  # noqa: ANN202
        return CLIPTokenizer.from_pretrained(src, model_max_length=max_length, local_files_only=local_files_only)

    if folder is None:
        tok = _hub_or_error("CLIP-L", CLIP_HUB_ID, "clip_tokenizer", load, "vocab.json")
    else:
        _require_files(Path(folder), ("vocab.json", "merges.txt"), "CLIP-L tokenizer", "clip_tokenizer")
        tok = load(str(folder))
    if rows is not None:
        check_vocab(tok, rows, "CLIP-L", "clip_tokenizer")
    return tok


def load_t5_tokenizer(folder: str | Path | None, max_length: int = 512, rows: int | None = None):
    """T5 v1.1 tokenizer from ``folder`` (tokenizer.json), else the hub id when cached or online; ``rows``: as
    for load_clip_tokenizer."""
    from transformers import T5Tokenizer  # transformers 5: the tokenizers-backed class (T5TokenizerFast's alias)

    def load(src: str, local_files_only: bool = True):  # noqa: ANN202
        return T5Tokenizer.from_pretrained(src, model_max_length=max_length, local_files_only=local_files_only)

    if folder is None:
        tok = _hub_or_error("T5", T5_HUB_ID, "t5_tokenizer", load, "tokenizer.json")
    else:
        _require_files(Path(folder), ("tokenizer.json",), "T5 tokenizer", "t5_tokenizer")
        tok = load(str(folder))
    if rows is not None:
        check_vocab(tok, rows, "T5", "t5_tokenizer")
    return tok


def _require_files(folder: Path, names: tuple[str, ...], what: str, setting: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FluxpipeError(
            f"{what} folder {folder} lacks {', '.join(missing)}: point `{setting}` at a folder with {', '.join(names)}"
        )
