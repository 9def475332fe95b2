"""Aspect-ratio bucketing against values worked out by hand from the reference trainer's rules."""

from __future__ import annotations

import pytest

from fluxpipe.data.buckets import (
    BucketSpec,
    ResizePlan,
    check_spec,
    make_buckets,
    no_upscale_bucket,
    plan_resize,
    select_bucket,
)
from fluxpipe.errors import FluxpipeError

SPEC_512 = BucketSpec(resolution=(512, 512), enable_bucket=True)  # A = 262144, steps 64, 256..1024

# By hand, w = 256..1024 step 64, h = min(1024, floor(262144 / w / 64) * 64):
# 256->1024, 320->768 (819.2), 384->640 (682.7), 448->576 (585.1), 512->512, 576->448 (455.1),
# 640->384 (409.6), 704->320 (372.4), 768->320 (341.3), 832/896/960/1024->256; plus the swaps.
BUCKETS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_predefined_buckets_512():
    assert make_buckets(SPEC_512) == BUCKETS_512


def test_bucket_reso_snapped_to_steps():
    # min 300 -> 256 (down), max 1000 -> 1024 (up): the same list as with 256..1024.
    spec = BucketSpec(resolution=(512, 512), enable_bucket=True, min_bucket_reso=300, max_bucket_reso=1000)
    assert make_buckets(spec) == BUCKETS_512


def test_bucket_height_capped_at_max_bucket_reso():
    # min 128: w=128 gives floor(262144/128/64)*64 = 2048, capped to 1024; w=192: 1344 -> 1024.
    buckets = make_buckets(BucketSpec(resolution=(512, 512), enable_bucket=True, min_bucket_reso=128))
    assert (128, 1024) in buckets and (1024, 128) in buckets and (192, 1024) in buckets
    assert (128, 2048) not in buckets and max(max(b) for b in buckets) == 1024


def test_buckets_off_and_no_upscale_lists():
    assert make_buckets(BucketSpec(resolution=(512, 256))) == [(512, 256)]
    assert make_buckets(BucketSpec(resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True)) == []


def test_nonsquare_resolution_square_bucket():
    # A = 768*512 = 393216, sqrt = 627.06 -> floor(627.06/64)*64 = 576: the square is (576, 576).
    buckets = make_buckets(BucketSpec(resolution=(768, 512), enable_bucket=True))
    assert (576, 576) in buckets
    assert (640, 640) not in buckets


@pytest.mark.parametrize("steps", [0, -16, 8, 24, 40])
def test_steps_must_be_positive_multiple_of_16(steps):
    with pytest.raises(ValueError, match="bucket_reso_steps"):
        check_spec(BucketSpec(resolution=(512, 512), enable_bucket=True, bucket_reso_steps=steps))


def test_check_spec_errors_are_fluxpipe_errors():
    with pytest.raises(FluxpipeError):
        check_spec(BucketSpec(resolution=(512, 512), bucket_reso_steps=24))


def test_steps_32_accepted():
    check_spec(BucketSpec(resolution=(512, 512), enable_bucket=True, bucket_reso_steps=32))


def test_resolution_multiple_of_16_without_buckets():
    with pytest.raises(ValueError, match="multiples of 16"):
        check_spec(BucketSpec(resolution=(500, 512)))
    check_spec(BucketSpec(resolution=(496, 512)))


def test_resolution_within_bucket_reso_range():
    with pytest.raises(ValueError, match="min_bucket_reso"):
        check_spec(BucketSpec(resolution=(2048, 512), enable_bucket=True))  # 2048 > 1024
    with pytest.raises(ValueError, match="min_bucket_reso"):
        check_spec(BucketSpec(resolution=(512, 512), enable_bucket=True, min_bucket_reso=600))  # 576 > 512
    # Snapping makes these fit: 520 -> 512 (down), 1000 -> 1024 (up).
    check_spec(BucketSpec(resolution=(512, 512), enable_bucket=True, min_bucket_reso=520))
    check_spec(BucketSpec(resolution=(1024, 1024), enable_bucket=True, max_bucket_reso=1000))


def test_min_bucket_reso_below_one_step():
    with pytest.raises(ValueError, match="min_bucket_reso"):
        check_spec(BucketSpec(resolution=(512, 512), enable_bucket=True, min_bucket_reso=32))  # snaps to 0


def test_select_exact_bucket():
    assert select_bucket(320, 768, BUCKETS_512) == (320, 768)


def test_select_nearest_ratio():
    # 600/400 = 1.5: 576/448 = 1.286 (off 0.214), 640/384 = 1.667 (off 0.167), 704/320 = 2.2.
    assert select_bucket(600, 400, BUCKETS_512) == (640, 384)
    # 1000/1000 = 1 -> the square.
    assert select_bucket(1000, 1000, BUCKETS_512) == (512, 512)


def test_select_exact_beats_tie_and_ties_take_first_sorted():
    buckets = [(512, 512), (256, 256)]  # same ratio: unsorted on purpose
    assert select_bucket(512, 512, buckets) == (512, 512)  # exact match wins
    assert select_bucket(300, 300, buckets) == (256, 256)  # tie -> first in sorted order


def test_plan_upscale_to_bucket():
    # 600x400 -> (640, 384); ratio 1.5 < 1.667 so scale = 640/600: 400*1.0667 = 426.67 -> 427.
    plan = plan_resize(600, 400, SPEC_512)
    assert plan == ResizePlan(bucket=(640, 384), resized=(640, 427), crop_left=0, crop_top=21, upscale=True)


def test_plan_downscale_to_bucket():
    # 1200x800 -> same bucket; scale = 640/1200: 800*0.5333 = 426.67 -> 427; crop (427-384)//2 = 21.
    plan = plan_resize(1200, 800, SPEC_512, BUCKETS_512)
    assert plan == ResizePlan(bucket=(640, 384), resized=(640, 427), crop_left=0, crop_top=21, upscale=False)


def test_plan_wider_than_bucket_matches_height():
    # 2000x500 (ratio 4) -> nearest 1024/256 = 4 exactly; ratio not greater, so scale = 1024/2000.
    # 500*0.512 = 256 -> (1024, 256), no crop.
    plan = plan_resize(2000, 500, SPEC_512)
    assert plan == ResizePlan(bucket=(1024, 256), resized=(1024, 256), crop_left=0, crop_top=0, upscale=False)
    # 1100x250 (ratio 4.4) is wider than 4 -> scale = 256/250 = 1.024: 1100*1.024 = 1126.4 -> 1126.
    plan = plan_resize(1100, 250, SPEC_512)
    assert plan == ResizePlan(bucket=(1024, 256), resized=(1126, 256), crop_left=51, crop_top=0, upscale=True)


def test_plan_without_buckets_covers_resolution():
    # Bucket = resolution 512x512; 600x400 is wider -> scale = 512/400 = 1.28 -> 768x512, crop (768-512)//2.
    plan = plan_resize(600, 400, BucketSpec(resolution=(512, 512)))
    assert plan == ResizePlan(bucket=(512, 512), resized=(768, 512), crop_left=128, crop_top=0, upscale=True)
    # 512x256 target, 100x100 image: ratio 1 < 2 -> scale = 512/100 -> 512x512, crop top (512-256)//2.
    plan = plan_resize(100, 100, BucketSpec(resolution=(512, 256)))
    assert plan == ResizePlan(bucket=(512, 256), resized=(512, 512), crop_left=0, crop_top=128, upscale=True)


NO_UP = BucketSpec(resolution=(512, 512), enable_bucket=True, bucket_no_upscale=True)


def test_no_upscale_small_image_is_cropped_not_resized():
    # 300*200 <= 262144: no resize; bucket = (256, 192); crop (300-256)//2 = 22, (200-192)//2 = 4.
    assert no_upscale_bucket(300, 200, NO_UP) == ((256, 192), (300, 200))
    plan = plan_resize(300, 200, NO_UP)
    assert plan == ResizePlan(bucket=(256, 192), resized=(300, 200), crop_left=22, crop_top=4, upscale=False)


def test_no_upscale_large_wide_image():
    # 1000x500, ratio 2: target 724.08 x 362.04.
    # (a) width 724 -> 704, height 704/2 = 352 -> 320: ratio 2.2 (off 0.2)
    # (b) height 362 -> 320, width 320*2 = 640 -> 640: ratio 2.0 (off 0) -> resized (640, 320).
    assert no_upscale_bucket(1000, 500, NO_UP) == ((640, 320), (640, 320))


def test_no_upscale_large_tall_image_takes_width_choice():
    # 500x1000, ratio 0.5: target 362.04 x 724.08.
    # (a) width 362 -> 320, height 640 -> 640: ratio 0.5 (off 0)  -> resized (320, 320/0.5) = (320, 640)
    # (b) height 724 -> 704, width 352 -> 320: ratio 0.4545 (off 0.045)
    assert no_upscale_bucket(500, 1000, NO_UP) == ((320, 640), (320, 640))


def test_no_upscale_large_image_with_crop():
    # 1300x700, ratio 1.857143: target sqrt(262144*13/7) = 697.74 x 375.70.
    # (a) 698 -> 640, 640/1.857 = 344.6 -> 345 -> 320: ratio 2.0 (off 0.143)
    # (b) 376 -> 320, 320*1.857 = 594.3 -> 594 -> 576: ratio 1.8 (off 0.057) -> resized (594, 320)
    # bucket (576, 320); crop (594-576)//2 = 9.
    plan = plan_resize(1300, 700, NO_UP)
    assert plan == ResizePlan(bucket=(576, 320), resized=(594, 320), crop_left=9, crop_top=0, upscale=False)


def test_no_upscale_rounds_to_nearest_pixel_before_steps():
    # 620x490, ratio 62/49 = 1.2653: target sqrt(262144*62/49) = 575.93 x 455.17.
    # (a) 575.93 rounds to 576 first (the reference's round_to_steps), 576 -> 576; height 576*49/62 =
    #     455.2 -> 455 -> 448: ratio 1.2857 (off 0.020). Flooring 575.93 straight to steps would give 512.
    # (b) 455 -> 448, width 448*62/49 = 566.9 -> 567 -> 512: ratio 1.1429 (off 0.122).
    # (a) wins: resized (576, 455), bucket (576, 448), crop top (455-448)//2 = 3.
    plan = plan_resize(620, 490, NO_UP)
    assert plan == ResizePlan(bucket=(576, 448), resized=(576, 455), crop_left=0, crop_top=3, upscale=False)


def test_no_upscale_image_smaller_than_one_step():
    with pytest.raises(ValueError, match="smaller than bucket_reso_steps"):
        no_upscale_bucket(50, 300, NO_UP)


def test_nonpositive_image_size():
    with pytest.raises(ValueError, match="positive"):
        plan_resize(0, 100, SPEC_512)
