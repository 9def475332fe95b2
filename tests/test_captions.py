"""Caption augmentation against hand-computed values (the reference's process_caption semantics)."""

from __future__ import annotations

import random

import pytest

from fluxpipe.data.captions import (
    CaptionAugment,
    augment_caption,
    caption_rng,
    caption_slots,
    dropped_in_epoch,
    expand_wildcards,
    warmup_steps,
)


def _shuffled(tokens: list[str], seed: int) -> list[str]:
    out = list(tokens)
    random.Random(seed).shuffle(out)
    return out


def test_shuffle_keeps_the_first_keep_tokens_tags() -> None:
    aug = CaptionAugment(shuffle_caption=True, keep_tokens=2)
    got = augment_caption("sks dog,  on grass ,red collar,sunny, park", aug, random.Random(7))
    # the two kept tags stay in front; the other three are one rng.shuffle; ", " joins (tags stripped)
    assert got == ", ".join(["sks dog", "on grass", *_shuffled(["red collar", "sunny", "park"], 7)])


def test_shuffle_on_a_known_seed_is_a_fixed_order() -> None:
    # random.Random(0).shuffle of [b, c, d, e] (Python's documented, version-stable Mersenne Twister)
    aug = CaptionAugment(shuffle_caption=True, keep_tokens=1)
    assert augment_caption("a, b, c, d, e", aug, random.Random(0)) == "a, d, b, c, e"  # the order written out
    assert sorted(augment_caption("a, b, c, d, e", aug, random.Random(0)).split(", ")[1:]) == list("bcde")


def test_keep_tokens_separator_fixes_a_prefix_and_a_suffix() -> None:
    aug = CaptionAugment(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=3)
    got = augment_caption("sks, dog ||| a, b, c ||| best quality, 4k", aug, random.Random(3))
    assert got == "sks, dog, b, c, a, best quality, 4k"  # random.Random(3).shuffle([a, b, c]) = [b, c, a]


def test_keep_tokens_separator_absent_falls_back_to_keep_tokens() -> None:
    aug = CaptionAugment(shuffle_caption=True, keep_tokens_separator="|||", keep_tokens=1)
    assert augment_caption("x, y, z", aug, random.Random(5)) == ", ".join(["x", *_shuffled(["y", "z"], 5)])


def test_caption_dropout_rate_over_many_draws() -> None:
    aug = CaptionAugment(caption_dropout_rate=0.3)
    rng = random.Random(1)
    dropped = sum(augment_caption("a photo", aug, rng) == "" for _ in range(20000))
    assert abs(dropped / 20000 - 0.3) < 0.015  # binomial sd = 0.0032


def test_caption_dropout_draws_once_then_nothing() -> None:
    rng, twin = random.Random(9), random.Random(9)
    aug = CaptionAugment(caption_dropout_rate=1.0, shuffle_caption=True)
    assert augment_caption("a, b, c", aug, rng) == ""
    twin.random()
    assert rng.random() == twin.random()  # exactly one draw was made


def test_dropout_every_n_epochs_counts_epochs_from_one() -> None:
    aug = CaptionAugment(caption_dropout_every_n_epochs=3)
    got = [augment_caption("cat", aug, random.Random(0), epoch=e) for e in range(7)]
    assert got == ["cat", "cat", "", "cat", "cat", "", "cat"]  # 3rd and 6th epoch
    assert [dropped_in_epoch(aug, e) for e in range(3)] == [False, False, True]


def test_tag_dropout_rate_and_kept_tokens() -> None:
    aug = CaptionAugment(caption_tag_dropout_rate=0.25, keep_tokens=1)
    rng = random.Random(2)
    tags = [f"t{i}" for i in range(10)]
    kept = 0
    for _ in range(2000):
        out = augment_caption(", ".join(["keep", *tags]), aug, rng).split(", ")
        assert out[0] == "keep"
        kept += len(out) - 1
    assert abs(kept / 20000 - 0.75) < 0.015


def test_tag_dropout_uses_one_draw_per_tag() -> None:
    aug = CaptionAugment(caption_tag_dropout_rate=0.5)
    draws = [random.Random(4).random() for _ in range(1)]
    rng = random.Random(4)
    u = [rng.random() for _ in range(3)]
    expected = [t for t, x in zip("abc", u, strict=True) if x >= 0.5]
    assert augment_caption("a,b,c", aug, random.Random(4)) == ", ".join(expected)
    assert draws[0] == u[0]


def test_wildcards_pick_alternatives_and_keep_literal_braces() -> None:
    rng = random.Random(11)
    twin = random.Random(11)
    first, second = twin.choice(["red", "blue", "green"]), twin.choice(["cat", "dog"])
    assert expand_wildcards("{{x}} a {red|blue|green} {cat|dog}", rng) == f"{{x}} a {first} {second}"


def test_wildcard_multiline_picks_a_line_without_wildcards_the_first() -> None:
    twin = random.Random(6)
    line = twin.choice(["one", "two", "three"])
    assert augment_caption("one\ntwo\nthree", CaptionAugment(enable_wildcard=True), random.Random(6)) == line
    assert augment_caption("one\ntwo", CaptionAugment(), random.Random(6)) == "one"


def test_secondary_separator_after_shuffle() -> None:
    aug = CaptionAugment(secondary_separator=";;;", shuffle_caption=True, keep_tokens=2)
    # "a;;;b" is one tag while shuffling, then becomes "a,b"
    got = augment_caption("x, y, a;;;b, c", aug, random.Random(0))
    assert got == ", ".join(["x", "y", *_shuffled(["a;;;b", "c"], 0)]).replace(";;;", ",")
    assert augment_caption("a;;;b, c", CaptionAugment(secondary_separator=";;;"), random.Random(0)) == "a,b, c"


def test_token_warmup_shortens_the_flexible_tags() -> None:
    aug = CaptionAugment(token_warmup_min=1, token_warmup_step=4)
    # step s: floor(s * (5 - 1) / 4) + 1 tags
    got = [augment_caption("a,b,c,d,e", aug, random.Random(0), step=s) for s in range(6)]
    assert got == ["a", "a, b", "a, b, c", "a, b, c, d", "a, b, c, d, e", "a, b, c, d, e"]
    assert warmup_steps(CaptionAugment(token_warmup_step=0.25), 10) == 2


def test_caption_rng_depends_on_seed_epoch_and_item() -> None:
    draw = [caption_rng(s, e, i).random() for s, e, i in ((1, 0, "a"), (1, 0, "a"), (2, 0, "a"), (1, 1, "a"))]
    assert draw[0] == draw[1] and len(set(draw)) == 3
    assert caption_rng(1, 0, "a").random() != caption_rng(1, 0, "b").random()


@pytest.mark.parametrize("every", [0, 2])
def test_cached_slots_equal_the_uncached_draw_of_each_epoch(every: int) -> None:
    aug = CaptionAugment(shuffle_caption=True, caption_dropout_rate=0.2, caption_dropout_every_n_epochs=every)
    slots = caption_slots("a, b, c, d", aug, 5, "img.png", 4)
    assert len(slots) == 4
    for epoch in range(4):
        uncached = augment_caption("a, b, c, d", aug, caption_rng(5, epoch, "img.png"), epoch=epoch)
        cached = "" if dropped_in_epoch(aug, epoch) else slots[epoch % 4]
        assert cached == uncached


def test_one_slot_without_randomness() -> None:
    assert caption_slots("a, b\nsecond", CaptionAugment(keep_tokens=1), 0, "x", 4) == ["a, b"]
    assert CaptionAugment(caption_dropout_every_n_epochs=2).random is False
