"""A leaner start-up for the ``clipcap`` process: triton, which a CPU run never uses, is kept out.

``torch._dynamo`` is imported at module level by transformers' GPT-2 (``masking_utils``) and by
torchvision (``torchvision.ops``, through open_clip), and it imports triton whenever triton is
installed (torch's CUDA wheels bring it). Triton is the GPU kernel compiler: on a CPU it is never
run, and clipcap compiles nothing anywhere (its CUDA graphs and its CPU kernels need no triton).
Its library alone is ~75 MB of the first caption's peak RSS (issue 24, measured with
``benchmarks/bench_startup.py``: 1.81 -> 1.73 GB on full-size weights).

Only the console entry point turns this on (``enable``), for its own process: a program that
imports clipcap_cli as a library keeps its triton, and so do the tests (they call the Typer app).
Nothing is decided until something imports triton (torch itself looks for it while it is being
imported): then the device the command line asks for decides, once, without torch (``--device``; without
it, whether the machine has a GPU driver at all). On CUDA or MPS,
or with ``CLIPCAP_KEEP_TRITON=1``, triton imports as usual.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from collections.abc import Sequence

ENV = "CLIPCAP_KEEP_TRITON"


class TritonGate(importlib.abc.MetaPathFinder):
    """A finder that answers the first ``import triton``: refused on a CPU run, left alone otherwise."""

    def __init__(self, device: str | None):
        self.device = device

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name != "triton":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # decided once, either way
        if not keeps_triton_out(self.device):
            return None  # the next finders import it as usual
        sys.modules["triton"] = None  # type: ignore[assignment]  # later imports fail at once too
        raise ModuleNotFoundError("triton is kept out of a CPU run of clipcap (CLIPCAP_KEEP_TRITON=1)", name="triton")


def keeps_triton_out(device: str | None) -> bool:
    """Whether a run on ``device`` (the ``--device`` value; None: the best available) does without triton.

    Decided without torch: the question comes while torch itself is being imported (it looks for triton),
    so torch's own CUDA check cannot be asked. ``--device cpu`` keeps triton out; any other device keeps it;
    with no ``--device``, it is kept out only where no GPU can be (see ``gpu_possible``)."""
    if os.environ.get(ENV):
        return False
    if device and device.strip().lower() not in ("", "auto"):
        return device.strip().lower() == "cpu"
    return not gpu_possible()


# A CUDA driver's and a ROCm driver's files: where neither exists, torch finds no GPU either.
GPU_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd")


def gpu_possible() -> bool:
    """Whether this machine might have a GPU torch can use, read from files (no torch, no driver call).
    Off Linux the answer is yes: triton is then left alone."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in GPU_FILES)


def requested_device(argv: Sequence[str]) -> str | None:
    """The ``--device`` value on a command line (``--device X`` or ``--device=X``); None when absent."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return None


def enable(argv: Sequence[str]) -> TritonGate | None:
    """Called by ``entry.main`` with its arguments: this process is the ``clipcap`` command. Installs
    the gate (returned) unless triton is already imported."""
    if "triton" in sys.modules:
        return None
    gate = TritonGate(requested_device(argv))
    sys.meta_path.insert(0, gate)
    return gate
