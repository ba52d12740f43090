"""The Python API: a loaded ClipCap model that captions images, and the one captioning pipeline.

    import clipcap_cli
    model = clipcap_cli.load_model("coco")                  # or a checkpoint path
    for result in model.caption(["a.jpg", "b.png"], strategy="beam"):
        print(result.text, result.score)
    for out in model.stream(paths):                          # any number of images, lazily
        print(out.index, out.result.text if out.error is None else out.error)

``Captioner.stream`` is the pipeline every caller consumes (``caption()``, `clipcap caption`,
`clipcap eval --model`, the sharded runner): images are decoded in DataLoader workers while the
model runs, CLIP encodes each batch, and ``Captioner.decode`` turns the embeddings into captions.
Images go through exactly the extraction path (``images.open_rgb`` then CLIP's preprocess;
CLIP in fp16 on CUDA, its output cast to float32 before the mapper, as the original).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from clipcap_cli.data.images import as_rgb
from clipcap_cli.data.inputs import WORKERS, default_workers
from clipcap_cli.decoding.decode import DecodingOptions, DecodingResult, decode, default_batch_size

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from clipcap_cli.config import ModelConfig
    from clipcap_cli.eval.clipscore import ClipText
    from clipcap_cli.model import ClipCaptionModel

ImageInput = Union[str, Path, bytes, "Image.Image"]
BATCH_SIZE = 16  # images per CLIP batch in ``encode``, and eval's --batch-size default


@dataclass(frozen=True)
class Captioned:
    """One input's outcome in ``Captioner.stream``: a result, or the error that stopped it."""

    index: int  # the input's position in the stream
    result: DecodingResult | None  # None when ``error`` is set
    error: str | None = None  # why the input could not be captioned: one line, without its name
    embedding: torch.Tensor | None = None  # its CLIP embedding, shape = (D,), float32 on the CPU (embeddings=True)
    info: dict | None = None  # record fields the input carries (a shard sample's url and source caption)


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
        return self.preprocess_image(as_rgb(image))

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings (B, D) in float32 for preprocessed pixels (B, 3, H, W)."""
        from clipcap_cli.data.clip_image import encode_pixels

        return encode_pixels(self.clip_model, pixels).float()

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
            from clipcap_cli.eval.clipscore import rerank_decode

            return rerank_decode(self, clip_embedding.to(self.device), options, image_ids)
        return decode(self.model, self.tokenizer, clip_embedding.to(self.device), options, image_ids)

    def clip_text(self) -> ClipText:
        """The text side of this captioner's CLIP (for reranking), built on first use and kept."""
        if self._clip_text is None:
            from clipcap_cli.eval.clipscore import ClipText

            c = self.config
            self._clip_text = ClipText.load(c.clip_model, c.clip_pretrained, self.device, reuse=self.clip_model)
        return self._clip_text

    def stream(
        self,
        images: Iterable[Any],
        options: DecodingOptions | None = None,
        *,
        batch_size: int | None = None,
        workers: int | None = WORKERS,
        embeddings: bool = False,
        seed_id: Callable[[Any], int] | None = None,
        group_of: Callable[[Any], Hashable] | None = None,
    ) -> Iterator[Captioned]:
        """Caption any number of inputs, lazily: one ``Captioned`` per input, in input order.

        Args:
            images: paths, bytes, PIL images, objects with ``open_image()`` (``inputs.Source``,
                shard samples), or 1-D tensors (stored CLIP embeddings, captioned without CLIP).
                May be a generator: it is read as the workers need more.
            options: decoding options (default ``DecodingOptions()``).
            batch_size: inputs per CLIP + decoding batch (None = ``decoding.default_batch_size``:
                what keeps this device busy for these options).
            workers: processes decoding images ahead of the model (0 = in this process;
                None = ``default_workers(device)``).
            embeddings: also return each input's CLIP embedding (``Captioned.embedding``).
            seed_id: sampling only: ``seed_id(input)`` is the id the input draws its seed from
                (default: its position in the stream, so image i uses ``seed + i``).
            group_of: inputs with different ``group_of(input)`` never share a batch.

        A bad input yields an error and the stream goes on; errors of the model itself raise.
        """
        import torch

        from clipcap_cli.data.inputs import load_batches

        options = options or DecodingOptions()
        items = _as_list(images) if _is_single(images) else images
        batch_size = batch_size or default_batch_size(self.device, options, self.model)
        workers = default_workers(self.device) if workers is None else workers
        if isinstance(items, Sized):  # no idle worker processes for a short list
            workers = min(workers, -(-len(items) // batch_size))
        batches = load_batches(
            items,
            self.preprocess_image,
            batch_size,
            workers,
            seed_id=seed_id,
            group_of=group_of,
            pin_memory=self.device.type == "cuda",
        )
        for batch in batches:
            positions = batch.pixel_positions + batch.embedding_positions
            found = []
            if batch.pixels is not None:
                found.append(self.encode_pixels(batch.pixels))  # (P, D)
            if batch.embeddings is not None:
                found.append(batch.embeddings.to(self.device).float())  # (E, D), e.g. stored fp16
            rows: dict[int, int] = {}  # position in the batch -> row of ``emb``
            results: list[DecodingResult] = []
            cpu = None
            if positions:
                order = sorted(range(len(positions)), key=positions.__getitem__)
                emb = torch.cat(found)[order]  # (P + E, D) in input order
                rows = {positions[k]: r for r, k in enumerate(order)}
                results = self.decode(emb, options, [batch.ids[positions[k]] for k in order])
                cpu = emb.cpu() if embeddings else None
            for p, index in enumerate(batch.indices):
                r = rows.get(p)
                yield Captioned(
                    index=index,
                    result=results[r] if r is not None else None,
                    error=batch.errors.get(p),
                    embedding=cpu[r] if r is not None and embeddings else None,
                    info=batch.info.get(p),
                )

    def caption(
        self,
        images: Sequence[ImageInput] | ImageInput,
        options: DecodingOptions | None = None,
        *,
        batch_size: int | None = None,
        workers: int | None = WORKERS,
        **overrides: Any,
    ) -> list[DecodingResult]:
        """Caption images (paths, bytes or PIL images): one ``DecodingResult`` per image, in order.

        ``overrides`` are DecodingOptions fields (``strategy="beam"``, ``num_captions=3``, ...).
        With sampling, image i draws from ``seed + i`` whatever the batch size. An unreadable
        image raises ``images.ImageError`` (``stream`` reports it and goes on instead).
        """
        from clipcap_cli.data.images import ImageError

        options = (options or DecodingOptions()).replace(**overrides) if overrides else (options or DecodingOptions())
        images = _as_list(images)
        results: list[DecodingResult] = []
        for out in self.stream(images, options, batch_size=batch_size, workers=workers):
            if out.error is not None:
                image = images[out.index]
                name = str(image) if isinstance(image, (str, Path)) else f"image {out.index}"
                raise ImageError(f"{name}: {out.error}")
            results.append(out.result)
        return results

    def __repr__(self) -> str:
        c = self.config
        gpt = str(next(self.model.gpt.parameters()).dtype).removeprefix("torch.")
        return f"Captioner({c.mapping}, K={c.prefix_length}, clip={c.clip_model}, gpt2={gpt}, device={self.device})"


def _is_single(images: Any) -> bool:
    from PIL import Image

    return isinstance(images, (str, Path, bytes, Image.Image))


def _as_list(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    return [images] if _is_single(images) else list(images)
