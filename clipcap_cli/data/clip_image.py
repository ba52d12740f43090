"""CLIP's image tower on its own (what captioning needs when no text is scored), and ``encode_pixels``,
the one way every pipeline (caption, extract, eval's CLIPScore, inspect) turns pixels into embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipImageEncoder(nn.Module):
    """The ``visual`` tower of an open_clip model, with open_clip's ``encode_image``."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings (B, D) of preprocessed pixels (B, 3, H, W), as open_clip's CLIP gives them."""
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features


def encode_pixels(clip_model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalised) CLIP image embeddings (B, D) of preprocessed ``pixels`` (B, 3, H, W).

    The pixels go to the model's device and dtype (fp16 on CUDA, as the original); the embeddings come
    back in that dtype, on that device, computed without gradients (callers may still use them in
    autograd code, unlike under ``inference_mode``).
    """
    param = next(clip_model.parameters())
    with torch.no_grad():
        return clip_model.encode_image(pixels.to(param.device, dtype=param.dtype, non_blocking=True))
