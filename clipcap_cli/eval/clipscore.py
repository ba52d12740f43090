"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021), and reranking captions by CLIP-S.

The formulas are those of the reference implementation (jmhessel/clipscore), restated:

* a caption c is read by CLIP's text tower as ``"A photo depicts " + c`` (CLIP tokenizer,
  truncated to the context length with the end token kept), references too;
* image and text features are L2-normalised (x / sqrt(sum x^2));
* CLIP-S(c, v) = 2.5 * max(cos(c, v), 0);
* RefCLIP-S(c, R, v) = the harmonic mean of CLIP-S(c, v) and max over r in R of cos(c, r) (text
  against text: not scaled by 2.5);
* the corpus value of either is the mean of the per-image values.

One difference, in a case real CLIPs never meet: the paper's Eq. 2 clips the reference side at 0
(max(max_r cos(c, r), 0)) but the reference script does not, which would let a negative side
give a negative or infinite harmonic mean; it is clipped here, and a harmonic mean of 0 and 0 is 0.
Features are compared in float64 (the reference normalises in the encoder's dtype: float16 on
a GPU), so values agree with the script to the precision of the encoders.

torch and open_clip are imported inside functions, so the CLI can read the names cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipcap_cli.errors import ModelNotAvailableError

if TYPE_CHECKING:
    import torch

    from clipcap_cli.captioner import Captioner
    from clipcap_cli.decoding.decode import DecodingOptions, DecodingResult

METRIC_NAMES: tuple[str, ...] = ("CLIPScore", "RefCLIPScore")  # as `clipcap eval` reports them
CANDIDATE_PREFIX = "A photo depicts "  # the reference's text prompt, put before every caption and reference
WEIGHT = 2.5  # the reference's w: stretches CLIP-S over about 0-1 for real captions
TEXT_BATCH = 256  # captions per text-tower batch (the reference's batch size)


# --------------------------------------------------------------------------- loading


def load_clip(model_name: str, pretrained: str | None, device: torch.device | str) -> tuple[Any, Any]:
    """(CLIP with both towers, preprocess): the one place clipcap builds a CLIP for its text side."""

    from clipcap_cli.weights import clip_tower

    return clip_tower.load_clip(model_name, pretrained, device, text=True)


def has_text_tower(clip_model: Any) -> bool:
    """Whether an open_clip model can encode text (an image-only build cannot)."""
    if not callable(getattr(clip_model, "encode_text", None)):
        return False
    # open_clip's CLIP keeps its text tower in these attributes, CustomTextCLIP in ``text``.
    return getattr(clip_model, "token_embedding", None) is not None or getattr(clip_model, "text", None) is not None


def get_tokenizer(model_name: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's tokenizer for ``model_name`` (an open_clip name or ``local-dir:PATH``)."""
    import open_clip

    try:
        return open_clip.get_tokenizer(model_name)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelNotAvailableError(f"the CLIP tokenizer of {model_name} cannot be loaded: {exc}") from exc


def check_clip(model_name: str, pretrained: str | None) -> None:
    """Refuse an unknown CLIP name or pretrained tag before anything slow runs (no weights read)."""
    from clipcap_cli.weights.clip_tower import clip_spec

    clip_spec(model_name, pretrained)


class ClipText:
    """CLIP's text side: the reference's prompt, the tokenizer and ``encode_text``."""

    def __init__(self, model: Any, tokenizer: Callable[[list[str]], torch.Tensor], device: torch.device | str):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    @classmethod
    def load(cls, model_name: str, pretrained: str | None, device: torch.device | str, reuse: Any = None) -> ClipText:
        """The text side of CLIP ``model_name``: ``reuse`` (a loaded CLIP) when it has a text
        tower, else a CLIP built with one."""
        model = reuse if reuse is not None and has_text_tower(reuse) else load_clip(model_name, pretrained, device)[0]
        return cls(model, get_tokenizer(model_name), device)

    def encode(self, captions: Sequence[str], prefix: str = CANDIDATE_PREFIX) -> torch.Tensor:
        """Raw (not normalised) text features, float32, shape = (N, D), of ``prefix + caption``."""
        import torch

        chunks = []
        with torch.no_grad():
            for start in range(0, len(captions), TEXT_BATCH):
                tokens = self.tokenizer([prefix + c for c in captions[start : start + TEXT_BATCH]])
                chunks.append(self.model.encode_text(tokens.to(self.device)).float())
        if not chunks:
            return torch.empty(0, 0)
        return torch.cat(chunks)


# --------------------------------------------------------------------------- the formulas


def normalize(features: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm, in float64, shape = (N, D) -> (N, D)."""
    x = features.double()
    return x / x.pow(2).sum(dim=-1, keepdim=True).sqrt()


def clip_s(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP-S of aligned rows: 2.5 * max(cos, 0), shape = (N,) from (N, D) and (N, D), float64."""
    cos = (normalize(image_features) * normalize(text_features)).sum(dim=-1)
    return WEIGHT * cos.clamp(min=0)


def reference_similarity(candidate_features: torch.Tensor, reference_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The text side of RefCLIP-S: for each candidate (N, D), max(max_r cos(c, r), 0) over its
    references (R_i, D), shape = (N,), float64."""
    import torch

    cands = normalize(candidate_features)
    best = [(normalize(refs) @ cand).max() for cand, refs in zip(cands, reference_features, strict=True)]
    return torch.stack(best).clamp(min=0) if best else torch.empty(0, dtype=torch.float64)


def harmonic_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2ab / (a + b) elementwise for a, b >= 0, and 0 where both are 0."""
    import torch

    total = a + b
    positive = total > 0
    return torch.where(
        positive, 2 * a * b / torch.where(positive, total, torch.ones_like(total)), torch.zeros_like(total)
    )


@dataclass(frozen=True)
class ClipScores:
    """CLIP-S (and RefCLIP-S when references were given) per image and over all of them."""

    clip_score: float  # mean of per_image_clip (0-2.5)
    per_image_clip: tuple[float, ...]  # CLIP-S of each image's caption, in input order
    ref_clip_score: float | None = None  # mean of per_image_ref; None without references
    per_image_ref: tuple[float, ...] | None = None  # RefCLIP-S of each image's caption

    def as_metrics(self) -> dict[str, float]:
        """{"CLIPScore": ..., "RefCLIPScore": ...} (the second only with references)."""
        out = {"CLIPScore": self.clip_score}
        if self.ref_clip_score is not None:
            out["RefCLIPScore"] = self.ref_clip_score
        return out


def score(
    image_features: torch.Tensor,
    captions: Sequence[str],
    text: ClipText,
    references: Sequence[Sequence[str]] | None = None,
) -> ClipScores:
    """CLIPScore (and RefCLIPScore with ``references``) of one caption per image.

    Args:
        image_features: raw CLIP image embeddings of the images, shape = (N, D), from the CLIP
            whose text side ``text`` is.
        captions: the N candidate captions.
        references: each image's reference captions (at least one each).
    """
    if len(captions) != image_features.shape[0]:
        raise ValueError(f"{len(captions)} captions for {image_features.shape[0]} images")
    if not captions:
        raise ValueError("nothing to score: no images")
    cand = text.encode(list(captions))
    per_clip = clip_s(image_features.to(cand.device), cand)  # (N,)
    if references is None:
        return ClipScores(float(per_clip.mean()), tuple(per_clip.tolist()))
    if len(references) != len(captions) or any(not refs for refs in references):
        raise ValueError("references: one non-empty list of captions per image")
    flat = [r for refs in references for r in refs]
    encoded = text.encode(flat)
    per_image, at = [], 0
    for refs in references:
        per_image.append(encoded[at : at + len(refs)])
        at += len(refs)
    per_ref = harmonic_mean(per_clip, reference_similarity(cand, per_image))  # (N,)
    return ClipScores(float(per_clip.mean()), tuple(per_clip.tolist()), float(per_ref.mean()), tuple(per_ref.tolist()))


# --------------------------------------------------------------------------- reranking


def rerank_decode(
    captioner: Captioner,
    clip_embedding: torch.Tensor,
    options: DecodingOptions,
    image_ids: Sequence[int] | None = None,
) -> list[DecodingResult]:
    """Decode candidates (``options.candidates()``) for CLIP image embeddings (B, D) and keep the
    ``num_captions`` with the highest CLIP-S on the captioner's own CLIP, best first (ties keep the
    decoder's order). ``score``/``scores`` stay the decoder's; ``clip_score``/``clip_scores`` are CLIP-S.
    """
    import dataclasses

    import torch

    from clipcap_cli.decoding.decode import decode_prefix

    model = captioner.model
    with torch.inference_mode():
        prefix = model.embed_prefix(clip_embedding)  # (B, K, E)
    found = decode_prefix(model, captioner.tokenizer, prefix, options.candidates(), image_ids)
    flat = [t for result in found for t in result.texts]
    if not flat:
        return []
    counts = torch.tensor([len(result.texts) for result in found], device=clip_embedding.device)
    text_features = captioner.clip_text().encode(flat)
    clip = clip_s(clip_embedding.repeat_interleave(counts, dim=0).to(text_features.device), text_features).tolist()
    results, at = [], 0
    for result in found:
        values = clip[at : at + len(result.texts)]
        at += len(result.texts)
        order = sorted(range(len(values)), key=lambda j: -values[j])[: options.num_captions]
        best = order[0]
        results.append(
            dataclasses.replace(
                result,
                text=result.texts[best],
                tokens=result.all_tokens[best],
                score=result.scores[best],
                texts=tuple(result.texts[j] for j in order),
                scores=tuple(result.scores[j] for j in order),
                clip_score=values[best],
                clip_scores=tuple(values[j] for j in order),
                all_tokens=tuple(result.all_tokens[j] for j in order),
            )
        )
    return results


# --------------------------------------------------------------------------- images for `clipcap eval`


def encode_image_files(
    model: Any,
    preprocess: Callable[[Any], torch.Tensor],
    files: Sequence[str],
    device: torch.device | str,
    batch_size: int = 16,
    workers: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Raw CLIP image embeddings (N, D), float32, of image files read as `clipcap caption` reads
    them; with the (file, error) of every image that could not be read (its row is left 0).
    ``on_progress(done, total)`` after each batch."""
    import torch

    from clipcap_cli.data.clip_image import encode_pixels
    from clipcap_cli.data.inputs import load_batches

    rows: dict[int, torch.Tensor] = {}
    failed: list[tuple[str, str]] = []
    done = 0
    for batch in load_batches([str(f) for f in files], preprocess, batch_size, workers):
        failed += [(str(files[batch.indices[p]]), error) for p, error in batch.errors.items()]
        if batch.pixels is not None:
            embedded = encode_pixels(model, batch.pixels).float().cpu()
            rows.update(zip([batch.indices[p] for p in batch.pixel_positions], embedded))
        done += len(batch.indices)
        if on_progress is not None:
            on_progress(done, len(files))
    if not rows:
        return torch.empty(0, 0), failed
    width = next(iter(rows.values())).shape[0]
    out = torch.zeros(len(files), width)
    for i, row in rows.items():
        out[i] = row
    return out, failed
