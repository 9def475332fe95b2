"""Bad inputs of issue 15 (items 3-5): each gets one line naming the file or setting and the fix (exit 2), or a
warning where the reference trains on; never a silent change or a traceback.

Every message a test sees is recorded; ``FLUXPIPE_BAD_INPUTS=out.jsonl pytest tests/test_bad_inputs.py`` writes
them, and ``python tests/bad_inputs_table.py`` turns them into docs/bad-inputs.md.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SHARED, dataset_toml, make_dataset
from PIL import Image

from fluxpipe.cli import main
from fluxpipe.errors import FluxpipeError
from fluxpipe.tools.demo import CLIP_DIR, FILES, T5_DIR

RECORD = os.environ.get("FLUXPIPE_BAD_INPUTS")
TOKENIZERS = next((p for p in (SHARED / "tokenizers", Path("/work/shared/tokenizers")) if p.is_dir()), None)


def said(case: str, message: str) -> str:
    """Record the message the user sees for ``case`` (for docs/bad-inputs.md) and return it."""
    if RECORD:
        with open(RECORD, "a", encoding="utf-8") as f:
            f.write(json.dumps({"case": case, "message": message}) + "\n")
    return message


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fluxpipe: error: ")]
    assert len(err) == 1, err
    return err[0]


def warnings(caplog: pytest.LogCaptureFixture, word: str) -> list[str]:
    """The warnings containing ``word``, as the command line logs them (level, logger, message)."""
    return [
        f"WARNING {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno == logging.WARNING and word in r.getMessage()
    ]


# ---- the dataset (manifest stage) -----------------------------------------------------------------------------


def manifest(tmp_path: Path, toml: Path) -> int:
    (tmp_path / "c.yaml").write_text(f"dataset_config: {toml}\ncache:\n  text_shards: 1\n  latent_shards: 1\n")
    return main(["manifest", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "m.parquet")])


def test_empty_and_blank_captions_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = make_dataset(tmp_path / "data", 3)
    images[0].with_suffix(".txt").write_text("")
    images[1].with_suffix(".txt").write_text("  \n\t\n")
    assert manifest(tmp_path, dataset_toml(tmp_path / "d.toml", tmp_path / "data")) == 2
    line = said("empty or whitespace-only caption file", error_line(capsys))
    assert "2 bad dataset files" in line and line.count("caption file is empty") == 2
    assert "img0000.txt" in line and "img0001.txt" in line


def test_tiny_image_and_gif_are_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_dataset(tmp_path / "data", 2)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(tmp_path / "data/dot.png")
    (tmp_path / "data/dot.txt").write_text("a dot")
    Image.new("RGB", (64, 64)).save(tmp_path / "data/anim.gif")
    with caplog.at_level(logging.WARNING):
        assert manifest(tmp_path, dataset_toml(tmp_path / "d.toml", tmp_path / "data")) == 0
    small = warnings(caplog, "dot.png")
    assert len(small) == 1 and "1x1 pixels" in small[0] and "64 px" in small[0]
    said("1x1 image (any side < 64 px)", small[0])
    gif = warnings(caplog, "anim.gif")
    assert len(gif) == 1 and "1 image files" in gif[0]
    said(".gif (or .tif, .heic, ...) in image_dir", gif[0])


def test_non_utf8_file_names_are_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fluxpipe.config.pipeline import load_pipeline
    from fluxpipe.workflow import dataset_files

    make_dataset(tmp_path / "data", 2)
    bad = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name: the file system hands it over with a surrogate escape
    Image.new("RGB", (64, 64)).save(tmp_path / "data" / bad)
    (tmp_path / "data" / os.fsdecode(b"caf\xe9.txt")).write_text("a cafe")
    toml = dataset_toml(tmp_path / "d.toml", tmp_path / "data")
    assert manifest(tmp_path, toml) == 2
    line = said("non-UTF-8 image file name (manifest)", error_line(capsys))
    assert "b'caf\\xe9.png'" in line and "rename" in line
    with pytest.raises(FluxpipeError, match=r"caf\\xe9\.png") as e:  # Snakemake would write it into its locks
        dataset_files(load_pipeline({"dataset_config": str(toml)}))
    said("non-UTF-8 image file name (Snakefile / Snakemake's lock)", f"fluxpipe: error: {e.value}")


def test_caption_extension_with_a_slash_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dataset(tmp_path / "data", 1)
    toml = dataset_toml(tmp_path / "d.toml", tmp_path / "data")
    toml.write_text(toml.read_text().replace('caption_extension = ".txt"', 'caption_extension = "caps/.txt"'))
    assert manifest(tmp_path, toml) == 2
    line = said("caption_extension containing /", error_line(capsys))
    assert "caption_extension" in line and "path separator" in line


def metadata_dataset(tmp_path: Path, second_key: str) -> Path:
    """A dataset TOML over tmp_path/data with fine-tune metadata keyed by stem: img0000 and ``second_key``."""
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"img0000": {"caption": "a square"}, second_key: {"caption": "a circle"}}))
    toml = tmp_path / "d.toml"
    toml.write_text(
        f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "data"}"\n'
        f'metadata_file = "{meta}"\n'
    )
    return toml


def test_metadata_keyed_by_file_stem_finds_the_image(tmp_path: Path) -> None:
    from fluxpipe.io.tables import read_parquet

    images = make_dataset(tmp_path / "data", 2)  # img0000.jpg, img0001.png
    toml = metadata_dataset(tmp_path, "img0001")
    assert manifest(tmp_path, toml) == 0
    table, _ = read_parquet(tmp_path / "m.parquet")
    assert sorted(table.path) == sorted(str(p) for p in images)
    assert dict(zip(table.path, table.caption, strict=True))[str(images[0])] == "a square"


def test_metadata_key_without_an_image_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dataset(tmp_path / "data", 1)
    toml = metadata_dataset(tmp_path, "gone")
    assert manifest(tmp_path, toml) == 2
    line = said("fine-tune metadata key naming no image", error_line(capsys))
    assert f"{tmp_path / 'data/gone'}: image file not found" in line


# ---- the trainer's flags and output folder (all before any model loads) ----------------------------------------


def command(demo: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "lora",
        "--pretrained_model_name_or_path",
        str(demo / FILES["flux"]),
        "--clip_l",
        str(demo / FILES["clip_l"]),
        "--t5xxl",
        str(demo / FILES["t5xxl"]),
        "--ae",
        str(demo / FILES["ae"]),
        "--dataset_config",
        str(REPO / "config/demo/dataset.toml"),
        "--output_dir",
        str(out),
        "--output_name",
        "bad",
        "--network_module",
        "networks.lora_flux",
        "--max_train_steps",
        "1",
        "--clip_tokenizer",
        str(demo / CLIP_DIR),
        "--t5_tokenizer",
        str(demo / T5_DIR),
        *extra,
    ]


@pytest.mark.parametrize(
    ("case", "flags", "says"),
    [
        ("--network_dim 0", ["--network_dim", "0"], "--network_dim: 0 must be >= 1"),
        ("--save_every_n_steps=-3", ["--save_every_n_steps=-3"], "--save_every_n_steps: -3 must be >= 1"),
        ("--learning_rate=-1e-4", ["--learning_rate=-1e-4"], "--learning_rate: -0.0001 must be >= 0"),
        ("--learning_rate 0", ["--learning_rate", "0"], "nothing is trained"),
        (
            "--optimizer_args betas=0.9",
            ["--optimizer_args", "betas=0.9"],
            "--optimizer_args betas=0.9: betas must be a tuple of 2 floats, e.g. betas=0.9,0.999",
        ),
        ("--optimizer_args betas=0.9,0.99,0.1", ["--optimizer_args", "betas=0.9,0.99,0.1"], "tuple of 2 floats"),
        ("--optimizer_args weight_decay=high", ["--optimizer_args", "weight_decay=high"], "must be a number"),
        ("--optimizer_args wd=0.1 (no such argument)", ["--optimizer_args", "wd=0.1"], "AdamW has no argument 'wd'"),
        ("--output_name ../../x", ["--output_name", "../../x"], "must be a plain file name"),
    ],
)
def test_bad_flags_are_one_line_before_any_work(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, flags: list[str], says: str
) -> None:
    out = tmp_path / "out"
    assert main(command(demo_dir, out, *flags)) == 2
    line = said(case, error_line(capsys))
    assert says in line
    assert not (out / ".fluxpipe-cache").exists()  # refused before caches or models


def test_output_dir_that_is_a_file_or_cannot_be_made(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    assert main(command(demo_dir, tmp_path / "file")) == 2
    assert "is a file, not a folder" in said("--output_dir is a file", error_line(capsys))
    assert main(command(demo_dir, tmp_path / "file" / "sub")) == 2
    assert "cannot be created" in said("--output_dir cannot be created (below a file)", error_line(capsys))


def test_read_only_output_dir(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = Path.write_bytes

    def read_only(self: Path, data: bytes) -> int:  # chmod does not stop root, who runs these tests in CI
        if self.parent == tmp_path / "ro":
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(Path, "write_bytes", read_only)
    assert main(command(demo_dir, tmp_path / "ro")) == 2
    line = said("read-only --output_dir", error_line(capsys))
    assert "cannot write into it (Read-only file system)" in line


def test_second_trainer_on_the_same_output_is_refused(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (  # another run: holds the lock as fluxpipe would
                "import sys, time; from pathlib import Path; from fluxpipe.io.output_dir import output_lock\n"
                "with output_lock(Path(sys.argv[1]), 'bad'):\n    print('held', flush=True); time.sleep(60)"
            ),
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert main(command(demo_dir, out)) == 2
        line = said("two trainers on one --output_dir/--output_name", error_line(capsys))
        assert f"pid {holder.pid} on host {socket.gethostname()}" in line and str(out / ".bad.lock") in line
        assert json.loads((out / ".bad.lock").read_text())["pid"] == holder.pid  # the other run's lock is kept
    finally:
        holder.kill()
        holder.wait()
    from fluxpipe.io.output_dir import output_lock

    with output_lock(out, "bad") as lock:  # a killed holder's lock (kill -9: no cleanup) is free again
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_lock_of_a_dead_process_is_taken_over_and_released(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from fluxpipe.io.output_dir import output_lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".x.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level(logging.WARNING), output_lock(tmp_path, "x") as held:
        assert json.loads(held.read_text())["pid"] == os.getpid()
        with pytest.raises(FluxpipeError, match=f"pid {os.getpid()}"):  # a second run meanwhile
            with output_lock(tmp_path, "x"):
                pass
    assert not lock.exists()
    said("lock file left by a killed run", warnings(caplog, "taking over")[0])


def test_disk_full_while_saving_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from fluxpipe.io import safetensors_file
    from fluxpipe.io.safetensors_file import save_safetensors
    from fluxpipe.training import state as train_state

    path = tmp_path / "lora.safetensors"
    save_safetensors({"a": torch.ones(2)}, path)
    before = path.read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_file, "save_file", full)
    with pytest.raises(FluxpipeError) as e:
        save_safetensors({"a": torch.zeros(2)}, path)
    said("disk full while saving", f"fluxpipe: error: {e.value}")
    assert str(e.value).startswith(f"{path}: no space left") and "previous files are intact" in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]
    monkeypatch.setattr(train_state, "save_file", full)
    with pytest.raises(FluxpipeError, match="no space left"):
        train_state.save_state(
            train_state.TrainState(
                weights={"w": torch.ones(1)},
                optimizer={},
                scheduler={},
                rng={},
                extra={},
                step=1,
                epoch=0,
                batch_in_epoch=0,
            ),
            tmp_path / "x-state",
        )
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


def test_disk_full_during_training_is_exit_2_with_earlier_saves_intact(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    from fluxpipe.io import safetensors_file

    real, calls = safetensors_file.save_file, []

    def full_on_second_save(tensors: dict, path: str, metadata: dict | None = None) -> None:
        calls.append(os.path.basename(path).startswith(".bad"))  # the LoRA saves, not the cache shards
        if sum(calls) == 2 and calls[-1]:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.chdir(REPO)  # the demo dataset names its images relative to the repository
    monkeypatch.setattr(safetensors_file, "save_file", full_on_second_save)
    out = tmp_path / "out"
    assert main(command(demo_dir, out, "--max_train_steps", "2", "--save_every_n_steps", "1")) == 2
    line = said("disk full while saving (during training)", error_line(capsys))
    assert line == (
        f"fluxpipe: error: {out / 'bad.safetensors'}: no space left on the device while "
        "saving it; free some space and rerun (the previous files are intact; the unfinished file was "
        "removed)"
    )
    first = out / "bad-step00000001.safetensors"
    assert load_file(first)  # the step-1 LoRA is complete and readable
    assert sorted(p.name for p in out.glob("*.safetensors")) == [first.name]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / ".bad.lock").exists()  # the lock is released on the error too


# ---- text encoding: tokenizers and long captions ---------------------------------------------------------------


def test_offline_without_tokenizer_folder_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fluxpipe.models import text_encoders as te

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf/hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: "offline"
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf/hub"))
    start = time.perf_counter()
    with pytest.raises(FluxpipeError, match="`clip_tokenizer:` in config/config.yaml \\(or --clip_tokenizer\\)") as e:
        te.load_clip_tokenizer(None)
    said("offline, no --clip_tokenizer, not in the hub cache", f"fluxpipe: error: {e.value}")
    with pytest.raises(FluxpipeError, match="--t5_tokenizer") as e:
        te.load_t5_tokenizer(None)
    assert time.perf_counter() - start < 20  # no hub retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FluxpipeError, match="HF_HUB_OFFLINE is set") as e:
        te.load_t5_tokenizer(None)
    said("HF_HUB_OFFLINE=1, no --t5_tokenizer, not in the hub cache", f"fluxpipe: error: {e.value}")


def text_cache(tmp_path: Path, demo: Path, captions: list[str], clip_tok: Path, t5_tok: Path):  # noqa: ANN201
    from fluxpipe.stages import cache_text

    make_dataset(tmp_path / "data", len(captions))
    for i, caption in enumerate(captions):
        next((tmp_path / "data").glob(f"img{i:04d}.*")).with_suffix(".txt").write_text(caption)
    assert manifest(tmp_path, dataset_toml(tmp_path / "d.toml", tmp_path / "data")) == 0
    return cache_text.run(
        cache_text.CacheTextConfig(
            manifest=tmp_path / "m.parquet",
            clip_l=demo / FILES["clip_l"],
            t5xxl=demo / FILES["t5xxl"],
            clip_tokenizer=clip_tok,
            t5_tokenizer=t5_tok,
            out=tmp_path / "text.safetensors",
            shard=0,
            max_length=512,
            hash_cache=tmp_path / "h.json",
        )
    )


def test_empty_tokenizer_is_refused_before_encoding(demo_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "clip-empty"  # what transformers 5 builds from a folder it cannot read: 2 tokens
    empty.mkdir()
    (empty / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (empty / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(FluxpipeError, match="CLIP-L tokenizer has 2 tokens but its encoder embeds") as e:
        text_cache(tmp_path, demo_dir, ["a cat"], empty, demo_dir / T5_DIR)
    said("CLIP tokenizer with 2 tokens (empty) for the CLIP-L file", f"fluxpipe: error: {e.value}")
    assert not (tmp_path / "text.safetensors").exists()


def test_tokenizer_of_another_encoder_is_refused(demo_dir: Path, tmp_path: Path) -> None:
    if TOKENIZERS is None:
        pytest.skip("no shared tokenizers")
    real_t5 = TOKENIZERS / "t5-v1_1-xxl"
    with pytest.raises(FluxpipeError, match="T5 tokenizer has 32100 tokens but its encoder embeds") as e:
        text_cache(tmp_path, demo_dir, ["a cat"], demo_dir / CLIP_DIR, real_t5)
    said("real T5 tokenizer (32100 tokens) for a T5 file with fewer rows", f"fluxpipe: error: {e.value}")


def test_real_tokenizers_fit_the_real_embedding_rows() -> None:
    from transformers import CLIPTokenizer, T5TokenizerFast

    from fluxpipe.models.text_encoders import check_vocab

    if TOKENIZERS is None:
        pytest.skip("no shared tokenizers")
    check_vocab(CLIPTokenizer.from_pretrained(TOKENIZERS / "clip-vit-large-patch14"), 49408, "CLIP-L", "x")
    t5 = T5TokenizerFast.from_pretrained(TOKENIZERS / "t5-v1_1-xxl")
    check_vocab(t5, 32128, "T5", "x")  # 32100 tokens, 32128 rows (padding)
    with pytest.raises(FluxpipeError, match="has 32100 tokens but its encoder embeds 36000"):
        check_vocab(t5, 36000, "T5", "t5_tokenizer")


def test_long_caption_is_warned_once_with_its_token_counts(
    demo_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import CLIPTokenizer, T5TokenizerFast

    long = " ".join(["a photo of a red house in a green field"] * 60)
    clip_n = len(CLIPTokenizer.from_pretrained(demo_dir / CLIP_DIR)(long).input_ids)
    t5_n = len(T5TokenizerFast.from_pretrained(demo_dir / T5_DIR)(long).input_ids)
    assert clip_n > 77 and t5_n > 512
    with caplog.at_level(logging.WARNING):
        stats = text_cache(tmp_path, demo_dir, [long, "a cat", long], demo_dir / CLIP_DIR, demo_dir / T5_DIR)
    assert stats.encoded == 2
    cut = warnings(caplog, "tokens, only the first")
    assert len(cut) == 1  # once per caption, not per image or epoch
    assert f"{clip_n} CLIP tokens, only the first 77 are used" in cut[0]
    assert f"{t5_n} T5 tokens, only the first 512 are used" in cut[0]
    said("caption over 77 CLIP / 512 T5 tokens", cut[0])
