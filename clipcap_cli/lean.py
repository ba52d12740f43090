"""A leaner start-up for the ``clipcap`` process: triton, which a CPU run never uses, is kept out.

``torch._dynamo`` is imported at module level by transformers' GPT-2 (``masking_utils``) and by
torchvision (``torchvision.ops``, through open_clip), and it imports triton whenever triton is
installed (torch's CUDA wheels bring it). Triton is the GPU kernel compiler: on a CPU it is never
run, and clipcap compiles nothing anywhere (its CUDA graphs and its CPU kernels need no triton).
Its library alone is ~75 MB of the first caption's peak RSS (issue 24, measured with
``benchmarks/bench_startup.py``: 1.81 -> 1.73 GB on full-size weights).

Only the console entry point turns this on (``enable()``), for its own process: a program that
imports clipcap_cli as a library keeps its triton, and so do the tests (they call the Typer app).
``CLIPCAP_KEEP_TRITON=1`` keeps it in the console process too.
"""

from __future__ import annotations

import os
import sys

ENV = "CLIPCAP_KEEP_TRITON"
_enabled = False


def enable() -> None:
    """Called by ``entry.main``: this process is the ``clipcap`` command, whose imports are its own."""
    global _enabled
    _enabled = True


def keep_triton_out(device: str | None) -> bool:
    """Before the model's imports: on a CPU run of the ``clipcap`` process, make ``import triton``
    fail (torch then takes it as not installed). Returns whether it did; a no-op when triton is
    already imported, on CUDA or MPS, with ``CLIPCAP_KEEP_TRITON`` set, or outside the console."""
    if not _enabled or os.environ.get(ENV) or "triton" in sys.modules:
        return False
    from clipcap_cli.device import pick_device
    from clipcap_cli.errors import UsageError

    try:
        cpu = pick_device(device).type == "cpu"
    except UsageError:  # a bad --device: load_model says so, with its own message
        return False
    if cpu:
        sys.modules["triton"] = None  # type: ignore[assignment]  # Python's "not importable" marker
    return cpu
