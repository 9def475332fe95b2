"""Samples and validation loss during training: the triggers, names and the fixed validation noise."""

from __future__ import annotations

from pathlib import Path

import torch

from fluxpipe.data.prompts import SamplePrompt
from fluxpipe.training.monitor import MonitorSettings, fixed_noise, sample_due, sample_name, validation_due

PROMPTS = (SamplePrompt(index=0, prompt="x"),)


def test_sample_triggers_as_the_reference() -> None:
    steps = MonitorSettings(sample_prompts=PROMPTS, sample_every_n_steps=3)
    assert [s for s in range(1, 10) if sample_due(steps, s, None)] == [3, 6, 9]
    assert not sample_due(steps, 3, epoch_end=1)
    both = MonitorSettings(sample_prompts=PROMPTS, sample_every_n_steps=3, sample_every_n_epochs=2)
    assert not any(sample_due(both, s, None) for s in range(1, 10))  # the epoch setting replaces the steps
    assert [e for e in range(1, 7) if sample_due(both, 0, e)] == [2, 4, 6]
    assert not sample_due(MonitorSettings(sample_every_n_steps=1), 1, None)  # no prompts, no samples


def test_validation_triggers() -> None:
    default = MonitorSettings()
    assert all(validation_due(default, 0, e) for e in (1, 2, 3)) and not validation_due(default, 5, None)
    steps = MonitorSettings(validate_every_n_epochs=None, validate_every_n_steps=4)
    assert [s for s in range(1, 13) if validation_due(steps, s, None)] == [4, 8, 12]
    assert not validation_due(steps, 0, 1)


def test_sample_file_names() -> None:
    assert sample_name("lora", 40, 2, 3, 7, "20261126093000") == "lora_e000002_03_20261126093000_7.png"
    assert sample_name("lora", 40, None, 0, 7, "20261126093000") == "lora_000040_00_20261126093000_7.png"


def test_fixed_noise_is_fixed_per_item_and_sigma() -> None:
    a = fixed_noise((1, 16, 4, 4), 0, 5, 1)
    assert torch.equal(a, fixed_noise((1, 16, 4, 4), 0, 5, 1))
    assert not torch.equal(a, fixed_noise((1, 16, 4, 4), 0, 6, 1))
    assert not torch.equal(a, fixed_noise((1, 16, 4, 4), 0, 5, 2))
    assert not torch.equal(a, fixed_noise((1, 16, 4, 4), 1, 5, 1))


def test_log_tracker_name_is_the_event_folder(tmp_path: Path) -> None:
    """--log_tracker_name: as the reference's TensorBoard tracker, the events go to <run folder>/<tracker name>."""
    from fluxpipe.training.log import TrainLogger

    logger = TrainLogger(tmp_path, "demo_", tracker_name="my_tracker")
    logger.step(1, 0.5, {"unet": 1e-4})
    logger.close()
    (run,) = tmp_path.iterdir()
    assert run.name.startswith("demo_") and [p.name for p in run.iterdir()] == ["my_tracker"]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "my_tracker").iterdir())
