"""--logging_dir / --log_with: TensorBoard scalars of a training run, under the reference's tag names.

The run folder is ``<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`` as the reference's (the event files in its
``<log_tracker_name>`` subfolder when that is given; the reference's default name is not added); step logs ``loss/current``,
``loss/average`` (moving average over the last epoch's worth of steps), ``lr/<group>``; epoch logs
``loss/epoch_average``. TensorBoard comes with the ``tensorboard`` package (``pip install tensorboard``, or the
``fluxpipe[logging]`` extra); wandb is not supported (one error says so instead of logging nowhere).
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

from fluxpipe.errors import FluxpipeError


def check_logging(logging_dir: str | None, log_with: str | None) -> None:
    """Refuse what cannot be logged before any work is done."""
    if log_with in ("wandb", "all"):
        raise FluxpipeError(
            f"--log_with {log_with}: fluxpipe logs to TensorBoard only; use --log_with tensorboard "
            "(or leave it out) with --logging_dir"
        )
    if log_with == "tensorboard" and not logging_dir:
        raise FluxpipeError("--log_with tensorboard needs --logging_dir (the folder the event files go to)")
    if logging_dir:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise FluxpipeError(
                "--logging_dir: TensorBoard logging needs the tensorboard package: "
                "pip install tensorboard (or pip install 'fluxpipe[logging]')"
            ) from None


class TrainLogger:
    """Scalars for one run; a no-op without a logging folder."""

    def __init__(self, logging_dir: Path | None, log_prefix: str = "", window: int = 1, tracker_name: str = "") -> None:
        self.writer = None
        self.run_dir: Path | None = None
        self.recent: deque[float] = deque(maxlen=max(1, window))
        self.epoch_losses: list[float] = []
        if logging_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.run_dir = logging_dir / f"{log_prefix}{time.strftime('%Y%m%d%H%M%S')}"
            # --log_tracker_name: the reference's TensorBoard tracker writes to <run folder>/<tracker name>
            self.writer = SummaryWriter(log_dir=str(self.run_dir / tracker_name if tracker_name else self.run_dir))

    def step(self, step: int, loss: float, lrs: dict[str, float]) -> float:
        """Log one optimizer step; returns the moving-average loss (also shown in the progress bar)."""
        self.recent.append(loss)
        self.epoch_losses.append(loss)
        average = sum(self.recent) / len(self.recent)
        if self.writer is not None:
            self.writer.add_scalar("loss/current", loss, step)
            self.writer.add_scalar("loss/average", average, step)
            for name, lr in lrs.items():
                self.writer.add_scalar(f"lr/{name}", lr, step)
        return average

    def epoch(self, epoch: int) -> None:
        """Log the mean loss of the epoch that just ended (1-based, as the reference)."""
        if self.writer is not None and self.epoch_losses:
            self.writer.add_scalar("loss/epoch_average", sum(self.epoch_losses) / len(self.epoch_losses), epoch)
        self.epoch_losses = []

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
