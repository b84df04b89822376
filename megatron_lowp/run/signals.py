"""Signals around writes that must not be torn.

`deferred_interrupts()`: while a checkpoint is being written, Ctrl-C (SIGINT) is noted instead of
raising KeyboardInterrupt inside torch.distributed.checkpoint (which would leave a half-written
temporary directory and a long traceback). When the block ends, published or abandoned, the
interrupt is delivered: KeyboardInterrupt, which the command line turns into its one-line message
and exit status 130. Under torchrun every rank receives the signal and defers it the same way.
"""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def deferred_interrupts():
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread can install handlers (and receives signals)
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous in (signal.SIG_IGN, None):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if previous is signal.SIG_DFL or previous is signal.default_int_handler:
            raise KeyboardInterrupt
        previous(signal.SIGINT, None)
