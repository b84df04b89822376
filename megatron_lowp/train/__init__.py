"""Training: the loop, checkpoints, run directories, metrics."""

from megatron_lowp.train.loop import Trainer, TrainResult, train

__all__ = ["Trainer", "TrainResult", "train"]
