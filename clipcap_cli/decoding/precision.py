"""How the caption model runs on its device: its precision, chosen for the hardware.

- ``auto`` / ``fp32``: exact, the original's captions; the default everywhere.
- ``bf16``: GPT-2 (and CLIP, on the CPU) in bf16. Fast only where the hardware has bf16: CUDA GPUs
  with bf16, and CPUs with AVX512-BF16 or AMX (``cpu.capability()``). On a CPU without them bf16
  is emulated, 37x slower than fp32 (issue 24), so ``--precision bf16`` there runs in fp32 with one
  warning that says why and what to use instead (a script asking for bf16 keeps working, never at
  the emulated speed).
- ``int8``: the CPU only: dynamic int8 quantisation of GPT-2's, the mapper's and CLIP's linear
  layers (``quantize.quantize_int8``), done once at load.
- ``fast``: the fastest good mode on this hardware: bf16 on a CPU with native bf16, int8 on
  any other CPU; bf16 on CUDA (fp16 on a GPU without bf16); fp32 elsewhere (MPS).
- ``fp16``: CUDA only.

bf16, fp16 and int8 change some captions against fp32 (the README's speed tables count them).
torch is imported inside functions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from clipcap_cli.model import ClipCaptionModel

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8", "fast")
TRAIN_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")  # training: autocast dtypes only
DEFAULT_PRECISION = "auto"  # the CLI's --precision default: fp32, exact
log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` (one of PRECISIONS) on ``device`` -> "fp32", "bf16", "fp16" or "int8".

    bf16 on a CPU without native bf16 resolves to fp32, with one log warning (see the module docstring).

    Raises:
        UsageError: an unknown name, fp16 off CUDA, int8 off the CPU, or bf16 on a GPU without bf16.
    """
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        return "fp32"  # exact everywhere; the others change some captions, so they are asked for
    if precision == "fast":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if kind == "cpu":
            return "bf16" if cpu_has_bf16() else "int8"
        return "fp32"
    if precision == "fp16" and kind != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (on the CPU, use --precision fast)")
    if precision == "int8" and kind != "cpu":
        raise UsageError(f"--precision int8 is for the CPU ({kind} is not): use --precision fast")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bf16 (use fp16)")
    if precision == "bf16" and kind == "cpu" and not cpu_has_bf16():
        log.warning(bf16_fallback_message())
        return "fp32"
    return precision


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX), so bf16 is not emulated."""
    from clipcap_cli.cpu import capability

    return capability().native_bf16


def bf16_fallback_message(instead: str = "--precision fast (int8 on this CPU)") -> str:
    """The one warning line for bf16 asked for on a CPU without native bf16."""
    from clipcap_cli.cpu import capability

    return (
        f"--precision bf16: this CPU ({capability().isa}) has no native bf16 (AVX512-BF16 or AMX), where bf16 "
        f"runs many times slower than fp32; running in fp32 instead (faster here: {instead})"
    )


def dtype_of(precision: str) -> torch.dtype:
    """ "fp32" / "bf16" / "fp16" / "int8" -> the torch dtype of the weights that are not quantised
    (float32 for int8). Resolve "auto" and "fast" first."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
    if precision not in dtypes:
        raise UsageError(f"precision {precision!r} has no dtype: resolve it first (resolve_precision)")
    return dtypes[precision]


def apply_precision(model: ClipCaptionModel, precision: str = DEFAULT_PRECISION) -> str:
    """Put ``model`` in ``precision`` (in place) for captioning; returns the resolved name.

    bf16/fp16: only GPT-2's weights change dtype; decoding (``inference.StaticGPT2``) still keeps its
    residual stream and LayerNorms in fp32. The mapper stays fp32: it runs once per image (under 1%
    of the decoding time), and in bf16 it cost 5 of 64 identical captions against fp32 (43 instead
    of 48 on random weights). Decoding casts the prefix to GPT-2's dtype and computes log-probs and
    scores in fp32 (``decoding.py``).

    int8: GPT-2's and the mapper's linear layers are quantised (``quantize.quantize_int8``; the
    mapper's weights are the largest single matrices, and int8 keeps 4x less of them in memory).

    fp32 changes nothing. Call it once, on an inference model: training keeps fp32 weights.
    """
    device = next(model.gpt.parameters()).device
    resolved = resolve_precision(precision, device)
    if resolved == "int8":
        from clipcap_cli.decoding.quantize import quantize_int8

        quantize_int8(model.gpt)
        quantize_int8(model.clip_project)
    else:
        model.gpt.to(dtype_of(resolved))
    return resolved


def apply_clip_precision(clip: Any, precision: str, device: torch.device | str) -> Any:
    """CLIP's image tower for a resolved ``precision`` (in place; returns it): bf16 on the CPU (most of
    bf16's speed-up comes from CLIP there), int8's linear layers (1.9x at CLIP's shapes, issue 24),
    and as loaded otherwise (fp16 on CUDA, fp32 elsewhere: ``clip_tower.clip_dtype``)."""
    import torch

    if precision == "bf16" and torch.device(device).type == "cpu":
        return clip.to(torch.bfloat16)
    if precision == "int8":
        from clipcap_cli.decoding.quantize import quantize_int8

        return quantize_int8(clip)
    return clip
