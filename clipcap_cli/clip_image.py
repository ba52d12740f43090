"""CLIP's image tower on its own: what captioning needs from CLIP when no text is scored."""

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
