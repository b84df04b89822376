"""Evaluation and reporting: loss plots (comparison reports and benchmarks build on these)."""

from megatron_lowp.eval.plots import ema, loss_figure, plot_loss

__all__ = ["ema", "loss_figure", "plot_loss"]
