"""Loss plots: the curves drawn are the numbers logged."""

import pytest

from megatron_lowp.eval import ema, loss_figure, plot_loss


def rows(n, start=8.0):
    out = []
    for step in range(1, n + 1):
        row = {"step": step, "tokens": 100 * step, "loss": start - 0.01 * step}
        if step % 10 == 0:
            row["val_loss"] = start - 0.01 * step + 0.1
        out.append(row)
    return out


def test_ema_is_bias_corrected_and_lags_a_step():
    assert ema([3.0] * 5, 0.9) == pytest.approx([3.0] * 5)  # no pull towards zero at the start
    assert ema([0.0, 1.0], 0.5) == pytest.approx([0.0, 2 / 3])
    assert ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]


def test_figure_draws_the_logged_numbers():
    fig = loss_figure({"a": rows(100), "b": rows(10, start=7.0)}, title="t")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) >= {"a train (EMA over 5 points)", "a validation", "b train", "b validation"}
    assert list(lines["a validation"].get_xdata()) == [1000 * k for k in range(1, 11)]
    assert list(lines["a validation"].get_ydata()) == pytest.approx([8.0 - 0.1 * k + 0.1 for k in range(1, 11)])
    assert list(lines["b train"].get_ydata()) == pytest.approx([7.0 - 0.01 * s for s in range(1, 11)])
    assert ax.get_xlabel() == "tokens" and ax.get_title() == "t"


def test_plot_writes_a_png_and_skips_nan(tmp_path):
    data = rows(30)
    data[5]["loss"] = float("nan")
    out = plot_loss({"run": data}, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # the temporary file was renamed into place
