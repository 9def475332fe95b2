"""Tiny random-initialised FLUX.1 model files in exactly the official layouts, plus tiny tokenizers.

Written by ``fluxpipe demo-models OUT``: every stage then runs on a 2-core CPU in seconds through the
same code paths (strict loader, tokenizers loaded from folders) as the real 24 GB files.
Layout of OUT (the official file names and storage dtypes):

    flux1-dev.safetensors (bf16)   flux1-schnell.safetensors (bf16)   ae.safetensors (fp32)
    clip_l.safetensors (fp16, text_model.* keys)   t5xxl_fp16.safetensors (fp16)
    tokenizers/clip-vit-large-patch14/ (vocab.json, merges.txt)   tokenizers/t5-v1_1-xxl/ (tokenizer.json)
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxpipe.io.atomic import write_text_atomic
from fluxpipe.io.safetensors_file import save_safetensors
from fluxpipe.models import text_encoders as te
from fluxpipe.models.autoencoder import AutoEncoder, tiny_ae
from fluxpipe.models.chroma import Chroma, tiny_chroma
from fluxpipe.models.flux import Flux, tiny

log = logging.getLogger(__name__)

CLIP_DIR = "tokenizers/clip-vit-large-patch14"
T5_DIR = "tokenizers/t5-v1_1-xxl"
FILES = {
    "flux": "flux1-dev.safetensors",
    "flux_schnell": "flux1-schnell.safetensors",
    "ae": "ae.safetensors",
    "clip_l": "clip_l.safetensors",
    "t5xxl": "t5xxl_fp16.safetensors",
}
TEXT_WIDTH = 64  # hidden size of both tiny text encoders (= vec_in_dim and context_in_dim of the tiny DiT)

# Training text for the tiny tokenizers: plain English about the kind of photos in the demo dataset.
CORPUS = """
a photo of a cat. a photo of a dog. an astronaut in a white space suit holding a flag.
a cup of coffee on a wooden table, seen from above. a rocket launching into a clear blue sky at dawn.
a close-up of a tabby cat lying on a blanket. a picture of the night sky full of distant galaxies.
a painting of a mountain lake in the style of an old master. a red car parked on a quiet street.
a portrait of a woman with long hair, soft light, high detail. grass, gravel and brick textures.
the quick brown fox jumps over the lazy dog. sharp focus, shallow depth of field, 35mm film photo.
"""


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (CLIP, GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def learn_bpe(text: str, num_merges: int) -> list[tuple[str, str]]:
    """CLIP-style BPE merges (word-final symbols carry '</w>'), most frequent pair first, ties by name."""
    byte_char = bytes_to_unicode()
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()))
    seqs = {}
    for word, n in words.items():
        chars = [byte_char[b] for b in word.encode("utf-8")]
        seqs[tuple(chars[:-1] + [chars[-1] + "</w>"])] = n
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for seq, n in seqs.items():
            for pair in itertools.pairwise(seq):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        seqs = {_merge(seq, best): n for seq, n in seqs.items()}
    return merges


def _merge(seq: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


def write_clip_tokenizer(folder: Path, num_merges: int = 300) -> int:
    """A CLIP-format BPE tokenizer folder; <|startoftext|>, <|endoftext|> are the last two ids (as in CLIP)."""
    merges = learn_bpe(CORPUS, num_merges)
    base = list(bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    ids = {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}
    write_text_atomic(folder / "vocab.json", json.dumps(ids, ensure_ascii=False))
    write_text_atomic(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "do_lower_case": True,
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=1))
    return len(ids)


def write_t5_tokenizer(folder: Path) -> int:
    """A T5-format unigram tokenizer folder (pad 0, </s> 1, <unk> 2; '</s>' appended to every text).

    Pieces are the corpus words (score = log frequency) and single characters, so the file is the same
    on every run (a trained unigram model is not bit-reproducible).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", CORPUS.lower()))
    total = sum(words.values())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, math.log(n / total)) for w, n in sorted(words.items())]
    pieces += [(c, -12.0) for c in sorted({c for w in words for c in w})]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "tokenizer.json", tok.to_str())
    config = {
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "model_max_length": 512,
        "tokenizer_class": "T5Tokenizer",
    }
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=1))
    return tok.get_vocab_size()


def _tiny_clip_state(vocab: int) -> dict[str, torch.Tensor]:
    shapes = {
        "text_model.embeddings.token_embedding.weight": (vocab, TEXT_WIDTH),
        "text_model.embeddings.position_embedding.weight": (77, TEXT_WIDTH),
        "text_model.encoder.layers.0.mlp.fc1.weight": (2 * TEXT_WIDTH, TEXT_WIDTH),
        "text_model.encoder.layers.1.mlp.fc1.weight": (2 * TEXT_WIDTH, TEXT_WIDTH),
    }
    model = te.build_clip(te.clip_config_from_shapes(shapes))
    return {te.CLIP_FILE_PREFIX + k: v.half() for k, v in model.state_dict().items() if "position_ids" not in k}


def _tiny_t5_state(vocab: int) -> dict[str, torch.Tensor]:
    shapes = {
        "shared.weight": (vocab, TEXT_WIDTH),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (32, 2),
        "encoder.block.0.layer.0.SelfAttention.q.weight": (TEXT_WIDTH, TEXT_WIDTH),
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": (2 * TEXT_WIDTH, TEXT_WIDTH),
        "encoder.block.1.layer.0.SelfAttention.q.weight": (TEXT_WIDTH, TEXT_WIDTH),
    }
    model = te.build_t5(te.t5_config_from_shapes(shapes))
    # the embedding is one tied tensor: store it once, under `shared.weight` and `encoder.embed_tokens.weight`
    # as independent copies (safetensors refuses shared storage)
    return {k: v.half().clone() for k, v in model.state_dict().items()}


DEMO_WEIGHTS = Path(__file__).parents[1] / "demo_weights"  # trained tiny DiT and AE (tools/train_demo_models.py)
TRAINED = ("flux", "ae")  # the slots with trained files; the text encoders stay the random seed-0 ones


def write_demo_models(out: Path, seed: int = 0, trained: bool = False) -> dict[str, Path]:
    """Write all demo files under ``out`` (deterministic for a seed); returns slot -> path.

    ``trained``: the DiT and the AE are the files in ``DEMO_WEIGHTS``, trained on a world of coloured shapes at
    64 px with the seed-0 text encoders (so only seed 0); see demo_weights/PROVENANCE.md.
    """
    if trained and seed != 0:
        raise ValueError("the trained demo models go with the seed-0 text encoders: use seed 0")
    out.mkdir(parents=True, exist_ok=True)
    clip_vocab = write_clip_tokenizer(out / CLIP_DIR)
    t5_vocab = write_t5_tokenizer(out / T5_DIR)
    torch.manual_seed(seed)
    states = {
        "flux": {
            k: v.bfloat16()
            for k, v in Flux(tiny(True, vec_in_dim=TEXT_WIDTH, context_in_dim=TEXT_WIDTH)).state_dict().items()
        },
        "flux_schnell": {
            k: v.bfloat16()
            for k, v in Flux(tiny(False, vec_in_dim=TEXT_WIDTH, context_in_dim=TEXT_WIDTH)).state_dict().items()
        },
        "ae": AutoEncoder(tiny_ae()).state_dict(),
        "clip_l": _tiny_clip_state(clip_vocab),
        "t5xxl": _tiny_t5_state(-(-t5_vocab // 8) * 8),
    }
    paths = {}
    for slot, state in states.items():
        paths[slot] = out / FILES[slot]
        if trained and slot in TRAINED:
            shutil.copyfile(DEMO_WEIGHTS / FILES[slot], paths[slot])
            continue
        save_safetensors(
            state,
            paths[slot],
            metadata={"fluxpipe.tools.demo": f"tiny random-initialised model, seed {seed}; not a trained model"},
        )
    paths["clip_tokenizer"] = out / CLIP_DIR
    paths["t5_tokenizer"] = out / T5_DIR
    return paths


CHROMA_FILE = "chroma-tiny.safetensors"


def write_chroma_demo(out: Path, seed: int = 0) -> Path:
    """A tiny random-initialised Chroma DiT (bf16, the Chroma1-Base key layout) fitting the demo's T5 and AE;
    ``out/chroma-tiny.safetensors``. Chroma uses no CLIP-L: train and sample it with the demo's T5, tokenizers and
    AE from ``write_demo_models``."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    state = {k: v.bfloat16() for k, v in Chroma(tiny_chroma(context_in_dim=TEXT_WIDTH)).state_dict().items()}
    path = out / CHROMA_FILE
    save_safetensors(
        state, path, metadata={"fluxpipe.tools.demo": f"tiny random-initialised Chroma, seed {seed}; not trained"}
    )
    return path


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoModelsConfig:
    out: Path
    seed: int = 0
    trained: bool = False  # the trained shapes-world DiT and AE (fluxpipe/demo_weights) instead of random ones


def run(cfg: DemoModelsConfig) -> dict[str, Path]:
    """``fluxpipe demo-models``: write the tiny FLUX.1 files and tokenizers that the pipeline uses by default."""
    paths = write_demo_models(cfg.out, seed=cfg.seed, trained=cfg.trained)
    for name, path in paths.items():
        log.info("%s: %s", name, path)
    return paths
