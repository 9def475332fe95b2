"""Caption augmentation as the reference's ``process_caption`` does it (spec §9 subset keys), as pure functions.

``augment_caption(caption, aug, rng, epoch=..., step=..., max_train_steps=...)`` takes the caption the manifest
stored (``caption_prefix`` / ``caption_suffix`` already applied, which the reference does first as well) and
applies, in the reference's order and with its draws from a ``random.Random``:

1. dropout: ``rng.random() < caption_dropout_rate`` (drawn only when the rate is > 0), or every
   ``caption_dropout_every_n_epochs``-th epoch (1-based, as the reference counts epochs) -> ``""`` and nothing
   else is drawn;
2. wildcards (``enable_wildcard``): a multi-line caption becomes one ``rng.choice`` of its lines, then each
   ``{a|b|c}`` one ``rng.choice`` of its alternatives, left to right (``{{`` and ``}}`` are literal braces);
   without wildcards a multi-line caption keeps its first line;
3. tags (only with ``shuffle_caption``, ``token_warmup_step`` or ``caption_tag_dropout_rate``): split on
   ``caption_separator`` into fixed / flexible / fixed-suffix tags (``keep_tokens_separator`` splits the caption
   into up to three parts; else the first ``keep_tokens`` tags are fixed), token warm-up shortens the flexible
   tags, ``rng.shuffle`` shuffles them, tag dropout drops each with one ``rng.random() < rate`` draw, and the
   tags are joined with ``", "`` (the reference's join, whatever the separator);
4. ``secondary_separator`` is replaced by ``caption_separator``.

``caption_rng(seed, epoch, item)`` is the generator of one item's caption in one epoch: the draws are a pure
function of (seed, epoch, item), so an epoch's caption can be cached (``caption_slots``) and replayed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True, kw_only=True, slots=True)
class CaptionAugment:
    """The caption keys of one subset (names and defaults as the reference's)."""

    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0

    @classmethod
    def of(cls, subset: Any) -> CaptionAugment:
        """The caption keys of a ``SubsetConfig`` (or any object with those attributes)."""
        return cls(**{f.name: getattr(subset, f.name) for f in dataclasses.fields(cls)})

    @property
    def random(self) -> bool:
        """Whether the caption can differ between epochs (the every-n-epochs dropout aside)."""
        return (
            self.shuffle_caption
            or self.enable_wildcard
            or self.caption_dropout_rate > 0
            or self.caption_tag_dropout_rate > 0
        )


def caption_rng(seed: int, epoch: int, item: str) -> random.Random:
    """The generator of ``item``'s caption in ``epoch`` (0-based); a str seed is hashed (sha512), so stable."""
    return random.Random(f"fluxpipe.caption:{int(seed)}:{int(epoch)}:{item}")


def dropped_in_epoch(aug: CaptionAugment, epoch: int) -> bool:
    """caption_dropout_every_n_epochs: the reference counts epochs from 1 (``epoch`` here is 0-based)."""
    n = aug.caption_dropout_every_n_epochs
    return n > 0 and (epoch + 1) % n == 0


def augment_caption(
    caption: str, aug: CaptionAugment, rng: random.Random, *, epoch: int = 0, step: int = 0, max_train_steps: int = 0
) -> str:
    """One training caption (module docstring); ``epoch`` is 0-based, ``step`` the optimizer step."""
    dropped = aug.caption_dropout_rate > 0 and rng.random() < aug.caption_dropout_rate
    if dropped or dropped_in_epoch(aug, epoch):
        return ""
    caption = expand_wildcards(caption, rng) if aug.enable_wildcard else caption.split("\n")[0]
    if aug.shuffle_caption or aug.token_warmup_step > 0 or aug.caption_tag_dropout_rate > 0:
        caption = _augment_tags(caption, aug, rng, step, max_train_steps)
    if aug.secondary_separator:
        caption = caption.replace(aug.secondary_separator, aug.caption_separator)
    return caption


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """A random line of a multi-line caption, then one random alternative per ``{a|b}``; ``{{``/``}}`` literal."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    open_, close = "⦅", "⦆"
    while open_ in caption or close in caption:
        open_, close = open_ + "⦅", close + "⦆"
    caption = caption.replace("{{", open_).replace("}}", close)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_, "{").replace(close, "}")


def split_tags(caption: str, aug: CaptionAugment) -> tuple[list[str], list[str], list[str]]:
    """(fixed, flexible, fixed suffix) tags, as the reference splits them."""
    sep, keep = aug.caption_separator, aug.keep_tokens_separator
    if keep and keep in caption:
        fixed_part, flex_part = caption.split(keep, 1)
        suffix: list[str] = []
        if keep in flex_part:
            flex_part, suffix_part = flex_part.split(keep, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        return fixed, [t.strip() for t in flex_part.split(sep) if t.strip()], suffix
    tokens = [t.strip() for t in caption.strip().split(sep)]
    if aug.keep_tokens > 0:
        return tokens[: aug.keep_tokens], tokens[aug.keep_tokens :], []
    return [], tokens, []


def warmup_steps(aug: CaptionAugment, max_train_steps: int) -> int:
    """token_warmup_step in steps: a value below 1 is a fraction of the training (floored, as the reference)."""
    w = aug.token_warmup_step
    return math.floor(w * max_train_steps) if w < 1 else int(w)


def _augment_tags(caption: str, aug: CaptionAugment, rng: random.Random, step: int, max_train_steps: int) -> str:
    fixed, flex, suffix = split_tags(caption, aug)
    warmup = warmup_steps(aug, max_train_steps)
    if warmup and step < warmup:
        flex = flex[: math.floor(step * ((len(flex) - aug.token_warmup_min) / warmup)) + aug.token_warmup_min]
    if aug.shuffle_caption:
        rng.shuffle(flex)
    if aug.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= aug.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


def caption_slots(caption: str, aug: CaptionAugment, seed: int, item: str, variants: int) -> list[str]:
    """The cached captions of one item: slot v is its caption of epoch v (``caption_rng(seed, v, item)``, without
    the every-n-epochs dropout, which the trainer applies per epoch); epoch e trains on slot e mod ``variants``.
    One slot when the subset draws nothing."""
    if not aug.random:
        return [augment_caption(caption, aug, caption_rng(seed, 0, item))]
    plain = dataclasses.replace(aug, caption_dropout_every_n_epochs=0)
    return [augment_caption(caption, plain, caption_rng(seed, v, item), epoch=v) for v in range(variants)]


def caption_sha256(text: str) -> str:
    """The identity of a caption in the text cache."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def slot_entries(caption: str, slots: list[str], drop_every: int, shard_of: Callable[[str], int]) -> str:
    """The manifest's ``text_captions`` column: JSON [[sha256, shard, text], ...] of every caption a row trains
    on (its slots, else its caption; the empty caption too when it has every-n-epochs dropout)."""
    texts = list(dict.fromkeys((slots or [caption]) + ([""] if drop_every else [])))
    return json.dumps([[caption_sha256(t), shard_of(caption_sha256(t)), t] for t in texts], ensure_ascii=False)


def text_entries(column: str) -> list[tuple[str, int, str]]:
    """(sha256, shard, text) of one manifest row's ``text_captions``."""
    return [(str(sha), int(shard), str(text)) for sha, shard, text in json.loads(column)]
