"""CapDec's noise injection (Nukrai, Mokady, Globerson 2022): train the mapper on CLIP *text*
embeddings, L2-normalised, with Gaussian noise, so that a normalised CLIP *image* embedding at
inference lands in the neighbourhood the mapper learned.

As DavidHuji/CapDec's train.py ``noise_injection`` (commit 4451bfd): variance 0 leaves the prefix
as it is; otherwise normalise, add N(0, variance) to every coordinate, normalise again. Only
training batches get noise; the validation loss is computed on the clean (normalised) prefix.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from clipcap_cli.config import ModelConfig
    from clipcap_cli.train.options import TrainOptions

CAPDEC_VARIANCE = 0.016  # the paper's best (and its README's) noise variance: std = sqrt(0.016) ~ 0.126


def default_variance(from_text: bool) -> float:
    """``--noise-variance`` when not given: CapDec's 0.016 for a text store, none for images."""
    return CAPDEC_VARIANCE if from_text else 0.0


def check_variance(variance: float | None) -> None:
    if variance is not None and not (math.isfinite(variance) and variance >= 0):
        raise UsageError(f"noise-variance must be a finite number >= 0, got {variance}")


def resolve(opts: TrainOptions, config: ModelConfig) -> TrainOptions:
    """``opts`` with the automatic noise variance filled in from the run's model (text store or not)."""
    if opts.noise_variance is not None:
        return opts
    return opts.replace(noise_variance=default_variance(config.from_text))


def add_noise(x: torch.Tensor, variance: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` + N(0, ``variance``) on every coordinate (std = sqrt(variance)); no normalisation."""
    import torch

    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + noise * math.sqrt(variance)


def inject_noise(prefix: torch.Tensor, variance: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, D) CLIP embeddings -> normalised, plus N(0, ``variance``) noise, normalised again.

    Draws from ``generator`` or, by default, the global torch RNG of the prefix's device (saved in
    ``resume.pt``, so a resumed run draws the same noise as an uninterrupted one).
    """
    from torch.nn import functional as F

    if variance == 0:
        return prefix  # as CapDec: no noise, no change (the model normalises when normalize_prefix is set)
    return F.normalize(add_noise(F.normalize(prefix.float(), dim=-1), variance, generator), dim=-1)
