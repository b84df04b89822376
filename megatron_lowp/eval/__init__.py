"""Evaluation and reporting: loss and perplexity (evaluate), lm-eval-harness tasks (harness), generation,
Hugging Face export (export), run comparisons (compare, summary) and loss plots (plots)."""

from megatron_lowp.eval.plots import ema, loss_figure, plot_loss

__all__ = ["ema", "loss_figure", "plot_loss"]
