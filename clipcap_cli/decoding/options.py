"""What decoding is asked to do: ``DecodingOptions`` (every decoding default, checked on creation, the
rule of what a reranked search runs) and ``DecodingResult`` (what it gives back). No torch here, so the
CLI reads the defaults for free; ``decode.py`` runs the search.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from clipcap_cli.errors import UsageError, check_number

STRATEGIES: tuple[str, ...] = ("greedy", "beam", "sample")
RERANKERS: tuple[str, ...] = ("clip",)  # DecodingOptions.rerank values (see clipscore.py)
RERANK_SAMPLES = 5  # rerank with sampling and num_captions 1: samples drawn to choose from
Hypothesis = tuple[list[int], float]  # (token ids, score)


@dataclass(frozen=True)
class DecodingOptions:
    """How to turn an image prefix into text. The single home of every decoding default."""

    strategy: str = "greedy"  # "greedy" (the original predict.py's default), "beam" or "sample"
    beam_size: int = 5  # beam only: beams kept per image (the original's generate_beam default)
    num_captions: int = 1  # captions per image: the N best beams, or N samples
    top_p: float = 1.0  # sample only: nucleus mass kept (1.0 = no cut)
    top_k: int = 0  # sample only: keep the k likeliest tokens (0 = no limit)
    temperature: float = 1.0  # beam and sample: logits are divided by it (greedy: no effect)
    seed: int | None = None  # sample only: image i of a call draws from seed + i; None = random
    max_length: int = 67  # most tokens per caption, the stop token included (the original's 67)
    stop_token: str | None = None  # decoding stops after this token; None = the model config's (".")
    rerank: str | None = None  # "clip": order candidates by CLIP-S (which ones: ``candidates()``)

    def __post_init__(self) -> None:
        _verify(self)

    def replace(self, **changes: Any) -> DecodingOptions:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    @property
    def search(self) -> str:
        """The strategy that runs: reranking greedy output would rank one caption, so greedy with
        ``rerank`` searches ``beam_size`` beams instead (the one home of that rule)."""
        return "beam" if self.strategy == "greedy" and self.rerank is not None else self.strategy

    def candidates(self) -> DecodingOptions:
        """The decoding that yields the candidates ``rerank`` chooses among: all ``beam_size`` beams
        (beam search, and greedy with ``rerank``), or ``num_captions`` samples (RERANK_SAMPLES when 1)."""
        if self.search == "sample":
            return self.replace(
                rerank=None, num_captions=self.num_captions if self.num_captions > 1 else RERANK_SAMPLES
            )
        return self.replace(rerank=None, strategy="beam", num_captions=self.beam_size)


def _verify(o: DecodingOptions) -> None:
    """Refuse values and combinations that cannot work or would be silently ignored."""
    if o.strategy not in STRATEGIES:
        raise UsageError(f"unknown decoding strategy {o.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if o.beam_size < 1:
        raise UsageError(f"beam_size must be at least 1, got {o.beam_size}")
    if o.num_captions < 1:
        raise UsageError(f"num_captions must be at least 1, got {o.num_captions}")
    if o.max_length < 1:
        raise UsageError(f"max_length must be at least 1, got {o.max_length}")
    check_number("temperature", o.temperature, low=0, low_open=True)
    check_number("top_p", o.top_p, low=0, high=1, low_open=True)
    if o.top_k < 0:
        raise UsageError(f"top_k must be 0 (no limit) or positive, got {o.top_k}")
    if o.stop_token is not None and o.stop_token == "":
        raise UsageError("stop_token must not be empty")
    if o.strategy != "sample":
        ignored = [
            name
            for name, on in (("top_p", o.top_p != 1.0), ("top_k", o.top_k != 0), ("seed", o.seed is not None))
            if on
        ]
        if ignored:
            raise UsageError(
                f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} for sampling only: "
                "set strategy to 'sample'"
            )
    if o.rerank is not None and o.rerank not in RERANKERS:
        raise UsageError(f"unknown reranker {o.rerank!r}: choose {', '.join(RERANKERS)}")
    if o.search == "greedy":
        if o.num_captions > 1:
            raise UsageError("greedy decoding gives one caption: num_captions > 1 needs strategy 'beam' or 'sample'")
        if o.temperature != 1.0:
            raise UsageError("temperature has no effect on greedy decoding: use strategy 'sample' or 'beam'")
    if o.search == "beam" and o.num_captions > o.beam_size:
        raise UsageError(f"num_captions ({o.num_captions}) cannot exceed beam_size ({o.beam_size})")


@dataclass(frozen=True)
class DecodingResult:
    """The caption(s) of one image, best first."""

    text: str  # the best caption, exactly tokenizer.decode(tokens) as the original (final "." kept)
    tokens: tuple[int, ...]  # its token ids
    score: float  # beam: the original's length-normalised score; greedy/sample: mean token log-prob
    texts: tuple[str, ...]  # num_captions captions, best first (texts[0] == text)
    scores: tuple[float, ...]  # their scores
    clip_score: float | None = None  # rerank="clip": CLIP-S of ``text`` (0-2.5); None = not reranked
    clip_scores: tuple[float, ...] | None = None  # rerank="clip": CLIP-S of each of ``texts``
    all_tokens: tuple[tuple[int, ...], ...] = ()  # the token ids of each of ``texts``
