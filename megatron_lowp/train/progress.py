"""Progress for people: a tqdm bar on a terminal, plain log lines everywhere else (CI, files)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def format_row(row: dict, total_steps: int) -> str:
    parts = [f"step {row['step']}/{total_steps}"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}")
    if "val_loss" in row:
        parts.append(f"val_loss {row['val_loss']:.4f}")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}")
    if "grad_norm" in row:
        parts.append(f"grad_norm {row['grad_norm']:.3f}")
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:,.0f} tok/s")
    return " | ".join(parts)


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool, silent: bool = False):
        """`silent`: show nothing (ranks other than 0 of a distributed run)."""
        self.total, self.silent = total_steps, silent
        self.bar = None
        if silent:
            return
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def show(self, row: dict) -> None:
        if self.bar is not None:
            post = {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}
            if "val_loss" in row:
                post["val"] = f"{row['val_loss']:.4f}"
            if "lr" in row:
                post["lr"] = f"{row['lr']:.1e}"
            if "tokens_per_s" in row:
                post["tok/s"] = f"{row['tokens_per_s']:,.0f}"
            self.bar.set_postfix(post, refresh=False)
        elif not self.silent:
            print(format_row(row, self.total), flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif not self.silent:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
