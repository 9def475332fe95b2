"""`fluxpipe manifest` on bad dataset settings: one error line naming the key, exit 2; and the bench smoke test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import dataset_toml, make_dataset

from fluxpipe.cli import main


def run(tmp_path: Path, toml_extra: str, capsys: pytest.CaptureFixture[str], subset_extra: str = "") -> tuple[int, str]:
    make_dataset(tmp_path / "data", 2)
    toml = dataset_toml(tmp_path / "d.toml", tmp_path / "data", extra=toml_extra)
    if subset_extra:
        toml.write_text(toml.read_text() + subset_extra + "\n")
    (tmp_path / "c.yaml").write_text(f"dataset_config: {toml}\n")
    code = main(["manifest", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "m.parquet")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "subset", "says"),
    [
        ("colour_aug = true", "", "unknown key"),
        ("batch_size = 'two'", "", "batch_size"),
        ("", "random_crop = true", "random_crop"),
        ("", "token_warmup_step = 10", "token_warmup_step"),
        ("", "color_aug = true", "color_aug"),
    ],
)
def test_bad_dataset_settings_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, subset: str, says: str
) -> None:
    code, err = run(tmp_path, extra, capsys, subset)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("fluxpipe: error:") and says in lines[0], err
    assert not (tmp_path / "m.parquet").exists()


def test_good_settings_write_the_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(tmp_path, "", capsys)
    assert code == 0 and (tmp_path / "m.parquet").is_file(), err


def test_bench_caches_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "bench",
                "caches",
                "--tiny",
                "--images",
                "2",
                "--size",
                "64",
                "--workers",
                "1",
                "--device",
                "cpu",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["stage"] for r in records] == ["manifest", "cache_latents", "cache_text"]
    assert records[1]["items"] == 2 and records[2]["items"] == 2


def test_augmented_captions_are_cached_as_slots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fluxpipe.data.captions import CaptionAugment, augment_caption, caption_rng, caption_sha256
    from fluxpipe.io.tables import read_parquet

    subset = "shuffle_caption = true\nkeep_tokens = 1\ncaption_dropout_every_n_epochs = 3"
    code, err = run(tmp_path, "", capsys, subset)
    assert code == 0, err
    table, _ = read_parquet(tmp_path / "m.parquet")
    aug = CaptionAugment(shuffle_caption=True, keep_tokens=1)
    for r in table.itertuples():
        slots = json.loads(r.caption_slots)
        # cached slot v = the caption the uncached mode draws in epoch v for this item (default seed 42)
        assert slots == [augment_caption(r.caption, aug, caption_rng(42, v, f"0:{r.path}")) for v in range(4)]
        entries = json.loads(r.text_captions)
        assert {sha for sha, _, _ in entries} == {caption_sha256(t) for t in [*slots, ""]}
        assert r.caption_drop_every == 3
