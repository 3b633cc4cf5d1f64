"""Capture what CUDA kernels print (device printf goes to the process's file descriptor 1, below
Python's sys.stdout): the trace builds' timelines (scripts/seesaw_trace.py,
scripts/fp8_trace.py)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def device_printf() -> Iterator[Callable[[], str]]:
    """Inside: fd 1 goes to a temporary file. Yields a function that returns what was printed up to
    its call (synchronizing the device first); fd 1 is restored on exit."""
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)

        def read() -> str:
            torch.cuda.synchronize()
            f.seek(0)
            return f.read()

        try:
            yield read
        finally:
            os.dup2(saved, 1)
            os.close(saved)
