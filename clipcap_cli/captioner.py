"""The Python API: a loaded ClipCap model that captions images.

    import clipcap_cli
    model = clipcap_cli.load_model("coco")                  # or a checkpoint path
    for result in model.caption(["a.jpg", "b.png"], strategy="beam"):
        print(result.text, result.score)

Images go through exactly the extraction path (``images.open_rgb`` then CLIP's preprocess;
CLIP in fp16 on CUDA, its output cast to float32 before the mapper, as the original).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from clipcap_cli.decoding import DecodingOptions, DecodingResult, decode

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from clipcap_cli.clipscore import ClipText
    from clipcap_cli.config import ModelConfig
    from clipcap_cli.model import ClipCaptionModel

ImageInput = Union[str, Path, bytes, "Image.Image"]
BATCH_SIZE = 16  # images per CLIP + decoding batch (the CLI's --batch-size default)
WORKERS = 0  # the CLI's --workers default: read and decode images in the main process


class Captioner:
    """A ClipCaptionModel with its CLIP encoder, preprocessing and tokenizer, on one device."""

    def __init__(
        self,
        model: ClipCaptionModel,
        clip_model: Any,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Any,
        device: torch.device,
    ):
        self.model = model
        self.clip_model = clip_model
        self.preprocess_image = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self._clip_text: ClipText | None = None  # rerank="clip": CLIP's text side, built on first use

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """One image (path, bytes or PIL image) -> CLIP input pixels, shape = (3, H, W).

        Raises ``images.ImageError`` for anything that is not a readable image.
        """
        return self.preprocess_image(to_rgb(image))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (B, D) in float32 for preprocessed pixels (B, 3, H, W)."""
        import torch

        dtype = next(self.clip_model.parameters()).dtype  # fp16 on CUDA
        with torch.no_grad():  # not inference_mode: callers may use the embeddings in autograd code
            return self.clip_model.encode_image(pixels.to(self.device, dtype=dtype)).float()

    def encode(self, images: Sequence[ImageInput] | ImageInput, batch_size: int = BATCH_SIZE) -> torch.Tensor:
        """CLIP image embeddings (N, D), float32, for images given as paths, bytes or PIL images."""
        import torch

        images = _as_list(images)
        chunks = [
            self.encode_pixels(torch.stack([self.preprocess(im) for im in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ]
        if not chunks:
            return torch.empty(0, self.config.prefix_size, device=self.device)
        return torch.cat(chunks)

    def decode(
        self,
        clip_embedding: torch.Tensor,
        options: DecodingOptions | None = None,
        image_ids: Sequence[int] | None = None,
        **overrides: Any,
    ) -> list[DecodingResult]:
        """Caption CLIP embeddings (B, D), e.g. from an extracted features store.

        ``image_ids`` (sampling only): the images' positions in the whole job, so that image i
        draws from ``seed + i`` however the job is batched. With ``rerank="clip"`` the candidates
        are ordered by CLIP-S on this captioner's CLIP (see ``clipscore.rerank_decode``).
        """
        options = (options or DecodingOptions()).replace(**overrides) if overrides else (options or DecodingOptions())
        if options.rerank is not None:
            from clipcap_cli.clipscore import rerank_decode

            return rerank_decode(self, clip_embedding.to(self.device), options, image_ids)
        return decode(self.model, self.tokenizer, clip_embedding.to(self.device), options, image_ids)

    def clip_text(self) -> ClipText:
        """The text side of this captioner's CLIP (for reranking), built on first use and kept."""
        if self._clip_text is None:
            from clipcap_cli.clipscore import ClipText

            c = self.config
            self._clip_text = ClipText.load(c.clip_model, c.clip_pretrained, self.device, reuse=self.clip_model)
        return self._clip_text

    def caption_pixels(
        self,
        pixels: torch.Tensor,
        options: DecodingOptions | None = None,
        image_ids: Sequence[int] | None = None,
        **overrides: Any,
    ) -> list[DecodingResult]:
        """Caption a batch of preprocessed pixels (B, 3, H, W): CLIP, mapper and decoding in one pass."""
        return self.decode(self.encode_pixels(pixels), options, image_ids, **overrides)

    def caption(
        self,
        images: Sequence[ImageInput] | ImageInput,
        options: DecodingOptions | None = None,
        *,
        batch_size: int = BATCH_SIZE,
        **overrides: Any,
    ) -> list[DecodingResult]:
        """Caption images (paths, bytes or PIL images): one ``DecodingResult`` per image, in order.

        ``overrides`` are DecodingOptions fields (``strategy="beam"``, ``num_captions=3``, ...).
        With sampling, image i draws from ``seed + i`` whatever the batch size.
        """
        import torch

        options = (options or DecodingOptions()).replace(**overrides) if overrides else (options or DecodingOptions())
        images = _as_list(images)
        results: list[DecodingResult] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = torch.stack([self.preprocess(im) for im in chunk])
            results.extend(self.caption_pixels(pixels, options, range(start, start + len(chunk))))
        return results

    def __repr__(self) -> str:
        c = self.config
        return f"Captioner({c.mapping}, K={c.prefix_length}, clip={c.clip_model}, device={self.device})"


def to_rgb(image: ImageInput) -> Image.Image:
    """Any accepted image input -> upright 8-bit RGB, as ``images.open_rgb`` does for files."""
    from PIL import Image

    from clipcap_cli.images import open_rgb
    from clipcap_cli.images import to_rgb as pil_to_rgb

    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    return open_rgb(image)


def _as_list(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    from PIL import Image

    if isinstance(images, (str, Path, bytes, Image.Image)):
        return [images]
    return list(images)
