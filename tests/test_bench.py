"""`fluxpipe bench train` configuration names (the benchmark itself needs a GPU)."""

from __future__ import annotations

import pytest

from fluxpipe.tools.bench import TRAIN_CONFIGS, parse_train_config


def test_configuration_names() -> None:
    assert parse_train_config("swap28") == {
        "gradient_checkpointing": True,
        "compile": False,
        "blocks_to_swap": 28,
        "fp8_base": False,
        "cpu_offload_checkpointing": False,
    }
    assert parse_train_config("none+compile")["gradient_checkpointing"] is False
    assert parse_train_config("none+compile")["compile"] is True
    assert parse_train_config("fp8+swap28")["fp8_base"] is True
    assert parse_train_config("offload+ckpt")["cpu_offload_checkpointing"] is True
    assert all(parse_train_config(name) for name in TRAIN_CONFIGS)
    with pytest.raises(ValueError, match="unknown benchmark configuration 'fast'"):
        parse_train_config("fast")
