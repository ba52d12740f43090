"""How the caption model runs on its device: GPT-2's precision (dtype), and host-to-device copies.

``auto`` means fp32 on every device today: fp32 decodes the original's algorithm exactly (the
decoding tests). bf16 is used only when asked for; on CPUs with AVX512-BF16/AMX it is about 2x
faster, and some captions differ from fp32's (the README's speed table gives both numbers). fp16
is for CUDA only. torch is imported inside functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from clipcap_cli.model import ClipCaptionModel

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
DEFAULT_PRECISION = "auto"  # the CLI's --precision default: fp32, exact


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``precision`` (one of PRECISIONS) on ``device`` -> "fp32", "bf16" or "fp16".

    Raises:
        UsageError: an unknown name, fp16 off CUDA, or bf16 on a GPU without bf16.
    """
    import torch

    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        return "fp32"  # exact everywhere; bf16/fp16 change some captions, so they are asked for
    if precision == "fp16" and kind != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (on the CPU, use bf16)")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU has no bf16 (use fp16)")
    return precision


def dtype_of(precision: str) -> torch.dtype:
    """ "fp32" / "bf16" / "fp16" -> the torch dtype (resolve "auto" first)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise UsageError(f"precision {precision!r} has no dtype: resolve it first (resolve_precision)")
    return dtypes[precision]


def apply_precision(model: ClipCaptionModel, precision: str = DEFAULT_PRECISION) -> str:
    """Put ``model``'s GPT-2 in ``precision`` (in place) for captioning; returns the resolved name.

    Only GPT-2's weights change dtype; decoding (``inference.StaticGPT2``) still keeps its residual
    stream and LayerNorms in fp32. The mapper stays fp32: it runs once per image (under 1% of the
    decoding time), and in bf16 it cost 5 of 64 identical captions against fp32 (43 instead of 48
    on random weights). Decoding casts the prefix to GPT-2's dtype and computes log-probs and
    scores in fp32 (``decoding.py``). Call it on an inference model: training keeps fp32 weights.
    """
    device = next(model.gpt.parameters()).device
    resolved = resolve_precision(precision, device)
    model.gpt.to(dtype_of(resolved))
    return resolved
