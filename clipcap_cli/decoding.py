"""Caption decoding: greedy, the original ClipCap beam search, and top-k/top-p sampling.

All three run a batch of images at once on GPT-2's KV cache (one new position per step instead
of the original's full re-forward), and drop images from the batch as they finish. Greedy and
beam search give the same tokens as the original's ``generate2`` / ``generate_beam`` run one
image at a time. torch is imported inside functions, so the CLI can read ``DecodingOptions``
defaults without paying for it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from clipcap_cli.model import ClipCaptionModel

STRATEGIES: tuple[str, ...] = ("greedy", "beam", "sample")
RERANKERS: tuple[str, ...] = ("clip",)  # DecodingOptions.rerank values (see clipscore.py)
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
    rerank: str | None = None  # "clip": order candidates by CLIP-S (which ones: clipscore.candidate_options)

    def __post_init__(self) -> None:
        _verify(self)

    def replace(self, **changes: Any) -> DecodingOptions:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)


def _verify(o: DecodingOptions) -> None:
    """Refuse values and combinations that cannot work or would be silently ignored."""
    if o.strategy not in STRATEGIES:
        raise UsageError(f"unknown decoding strategy {o.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if o.beam_size < 1:
        raise UsageError(f"beam size must be at least 1, got {o.beam_size}")
    if o.num_captions < 1:
        raise UsageError(f"num_captions must be at least 1, got {o.num_captions}")
    if o.max_length < 1:
        raise UsageError(f"max_length must be at least 1, got {o.max_length}")
    if not o.temperature > 0:
        raise UsageError(f"temperature must be positive, got {o.temperature}")
    if not 0 < o.top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {o.top_p}")
    if o.top_k < 0:
        raise UsageError(f"top_k must be 0 (no limit) or positive, got {o.top_k}")
    if o.stop_token is not None and o.stop_token == "":
        raise UsageError("stop_token must not be empty")
    if o.strategy != "sample":
        ignored = [name for name, on in (("top_p (--top-p)", o.top_p != 1.0), ("top_k (--top-k)", o.top_k != 0),
                                         ("seed (--seed)", o.seed is not None)) if on]
        if ignored:
            raise UsageError(f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} for sampling only: add --sample")
    if o.rerank is not None and o.rerank not in RERANKERS:
        raise UsageError(f"unknown reranker {o.rerank!r}: choose {', '.join(RERANKERS)}")
    # Reranking greedy output would rank one caption: it searches beam_size beams instead.
    beams = o.strategy == "beam" or (o.strategy == "greedy" and o.rerank is not None)
    if o.strategy == "greedy" and not beams:
        if o.num_captions > 1:
            raise UsageError("greedy decoding gives one caption: use --beam N or --sample for --num-captions > 1")
        if o.temperature != 1.0:
            raise UsageError("temperature has no effect on greedy decoding: use --sample or --beam")
    if beams and o.num_captions > o.beam_size:
        raise UsageError(f"num_captions ({o.num_captions}) cannot exceed the beam size ({o.beam_size})")


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


# --------------------------------------------------------------------------- text


def clean_up_tokenization(text: str) -> str:
    """transformers 4.x's ``clean_up_tokenization_spaces=True`` (the original's default).

    transformers 5 ignores that flag for BPE tokenizers, so the original's post-processing is
    applied here to give the same strings (e.g. "a dog ." -> "a dog.").
    """
    return (
        text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
        .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
        .replace(" 've", "'ve").replace(" 're", "'re")
    )


def tokens_to_text(tokenizer: Any, tokens: list[int] | tuple[int, ...]) -> str:
    """The caption text exactly as the original produced it: nothing stripped, case kept."""
    return clean_up_tokenization(tokenizer.decode(list(tokens), clean_up_tokenization_spaces=False))


def stop_token_id(tokenizer: Any, stop_token: str) -> int:
    """The id decoding stops at: the first token of ``stop_token`` (13 for "."), as the original."""
    ids = tokenizer.encode(stop_token)
    if not ids:
        raise UsageError(f"stop token {stop_token!r} encodes to no token")
    return int(ids[0])


# --------------------------------------------------------------------------- GPT-2 stepping


@functools.cache
def _forward_kwargs(forward_cls: type) -> tuple[str, bool]:
    """(name of the cache argument, whether ``logits_to_keep`` exists) for a GPT-2 class.

    transformers 5.x renamed ``past_key_values`` to ``cache``; older versions swallow an unknown
    ``cache=`` in ``**kwargs`` and silently recompute without it, so the name is read from the
    signature instead of guessed.
    """
    params = inspect.signature(forward_cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _new_cache(config: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # versions whose DynamicCache takes no config
        return DynamicCache()


class _Stepper:
    """GPT-2 over a growing sequence: each call feeds only the new positions, the rest is cached.

    Every row of the batch has the same length (the prefix has a fixed K and each step adds one
    token to every row), so no attention mask or padding is needed; positions are passed
    explicitly so GPT-2 sees K, K+1, ... for generated tokens as in a full forward.
    """

    def __init__(self, gpt: Any):
        self.gpt = gpt
        self.cache_kw, self.has_keep = _forward_kwargs(type(gpt))
        self.cache = _new_cache(gpt.config)
        self.length = 0

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits (R, V) at the last position after feeding ``embeds`` (R, T, E)."""
        import torch

        rows, new = embeds.shape[:2]
        positions = torch.arange(self.length, self.length + new, device=embeds.device).expand(rows, new)
        kwargs: dict[str, Any] = {self.cache_kw: self.cache, "use_cache": True, "position_ids": positions}
        if self.has_keep:
            kwargs["logits_to_keep"] = 1  # only the last position's logits: saves K-1 LM-head products
        logits = self.gpt(inputs_embeds=embeds, **kwargs).logits
        self.length += new
        return logits[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) the cached rows ``rows`` (R',) for the next step."""
        self.cache.batch_select_indices(rows)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # The original's exact arithmetic: softmax then log (not log_softmax), so near-ties break alike.
    return (logits / (temperature if temperature > 0 else 1.0)).softmax(-1).log()


# --------------------------------------------------------------------------- beam search


def beam_search(
    model: ClipCaptionModel,
    prefix: torch.Tensor,
    beam_size: int,
    max_length: int,
    stop_id: int,
    temperature: float = 1.0,
) -> list[list[Hypothesis]]:
    """The original ``generate_beam``, batched over images and KV-cached.

    Args:
        prefix: GPT-2 input embeddings of the images, shape = (B, K, E).
    Returns:
        For each image, ``beam_size`` (tokens, score) pairs sorted best first; score is the
        summed log-prob divided by the caption length, as the original returns them.

    The original's rules, kept exactly: the first step takes the top ``beam_size`` tokens of the
    single distribution; a stopped beam may only add token 0 ("!") at zero cost and its length
    stops growing; candidates are ranked by (summed log-prob) / (length of the source beam after
    this step), globally over beam x vocabulary; an image stops when all its beams have stopped.
    """
    import torch

    step = _Stepper(model.gpt)
    embed = model.embed_tokens
    n_images, w = prefix.shape[0], beam_size
    device = prefix.device
    logp = _log_probs(step(prefix), temperature)  # (B, V)
    vocab = logp.shape[-1]
    scores, next_tokens = logp.topk(w, dim=-1)  # (B, W): summed log-probs and first tokens
    step.select(torch.arange(n_images, device=device).repeat_interleave(w))  # each image's cache -> its W beams
    tokens = next_tokens.unsqueeze(-1)  # (B, W, T)
    seq_lengths = torch.ones(n_images, w, device=device, dtype=logp.dtype)  # tokens that count (fillers don't)
    stopped = next_tokens == stop_id  # (B, W)
    images = torch.arange(n_images, device=device)  # which input image each row block belongs to
    out: list[list[Hypothesis]] = [[] for _ in range(n_images)]
    beam_offsets = torch.arange(w, device=device)

    for _ in range(1, max_length):
        done = stopped.all(-1)  # (A,)
        if bool(done.any()):
            # Finished images leave the batch: the others decode exactly as if they were alone.
            for a in done.nonzero().flatten().tolist():
                out[int(images[a])] = _finish_beams(tokens[a], scores[a], seq_lengths[a])
            keep = (~done).nonzero().flatten()
            if keep.numel() == 0:
                return out
            tokens, scores, seq_lengths, stopped, images = (
                t[keep] for t in (tokens, scores, seq_lengths, stopped, images)
            )
            step.select((keep[:, None] * w + beam_offsets).flatten())
        n_active = tokens.shape[0]

        logits = step(embed(tokens[:, :, -1]).view(n_active * w, 1, -1))  # (A*W, V)
        logp = _log_probs(logits, temperature).view(n_active, w, vocab)  # (A, W, V)
        # A stopped beam can only be extended by token 0 at no cost: it keeps its score and
        # competes with its final average; its filler token is not counted in its length.
        logp[stopped] = -float("inf")
        logp[..., 0][stopped] = 0.0
        scores_sum = scores.unsqueeze(-1) + logp  # (A, W, V)
        seq_lengths = seq_lengths + (~stopped).to(seq_lengths.dtype)
        average = scores_sum / seq_lengths.unsqueeze(-1)  # ranked by mean log-prob
        average, flat = average.view(n_active, w * vocab).topk(w, dim=-1)  # (A, W)
        source = flat // vocab  # which beam each winner extends
        next_tokens = flat % vocab
        seq_lengths = seq_lengths.gather(1, source)
        tokens = torch.cat(
            (tokens.gather(1, source.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])), next_tokens.unsqueeze(-1)),
            dim=-1,
        )  # (A, W, T+1)
        stopped = stopped.gather(1, source) | (next_tokens == stop_id)
        scores = average * seq_lengths  # back to summed log-probs, via the same float ops as the original
        step.select((torch.arange(n_active, device=device)[:, None] * w + source).flatten())

    for a in range(tokens.shape[0]):
        out[int(images[a])] = _finish_beams(tokens[a], scores[a], seq_lengths[a])
    return out


def _finish_beams(tokens: torch.Tensor, scores: torch.Tensor, seq_lengths: torch.Tensor) -> list[Hypothesis]:
    """One image's beams (W, T) -> (tokens truncated to their length, score / length), best first."""
    final = scores / seq_lengths
    order = final.argsort(descending=True).tolist()
    lengths = seq_lengths.long().tolist()
    rows = tokens.tolist()
    values = final.tolist()
    return [(rows[j][: lengths[j]], float(values[j])) for j in order]


# --------------------------------------------------------------------------- greedy and sampling


def _decode_rows(
    model: ClipCaptionModel,
    prefix: torch.Tensor,
    max_length: int,
    stop_id: int,
    choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    temperature: float,
) -> list[Hypothesis]:
    """One token per row per step until the row emits the stop token (kept) or max_length.

    ``choose(logits (A, V), rows (A,))`` picks the next token of each active row; ``rows`` are
    indices into ``prefix`` (R, K, E). Scores are mean log-probs at ``temperature``.
    """
    import torch

    step = _Stepper(model.gpt)
    n_rows = prefix.shape[0]
    rows = torch.arange(n_rows, device=prefix.device)
    tokens: list[list[int]] = [[] for _ in range(n_rows)]
    logps: list[list[float]] = [[] for _ in range(n_rows)]
    logits = step(prefix)  # (R, V)
    for i in range(max_length):
        if i:
            logits = step(model.embed_tokens(next_tokens).unsqueeze(1))  # (A, V)  # noqa: F821 (set below)
        next_tokens = choose(logits, rows)  # (A,)
        token_logp = torch.log_softmax(logits.float() / temperature, -1).gather(1, next_tokens[:, None])[:, 0]
        for r, t, lp in zip(rows.tolist(), next_tokens.tolist(), token_logp.tolist()):
            tokens[r].append(t)
            logps[r].append(lp)
        finished = next_tokens == stop_id
        if bool(finished.any()):
            keep = (~finished).nonzero().flatten()
            if keep.numel() == 0:
                break
            rows, next_tokens = rows[keep], next_tokens[keep]
            step.select(keep)
    return [(t, sum(lp) / len(lp)) for t, lp in zip(tokens, logps)]


def greedy(model: ClipCaptionModel, prefix: torch.Tensor, max_length: int, stop_id: int) -> list[Hypothesis]:
    """The original ``generate2``: argmax each step (its top-p filter never changes the argmax),
    stop after the stop token (kept). One (tokens, mean log-prob) per row of ``prefix`` (B, K, E)."""
    return _decode_rows(model, prefix, max_length, stop_id, lambda logits, rows: logits.argmax(-1), 1.0)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (the top token always stays).

    Args:
        logits: shape = (R, V), already divided by the temperature.
    """
    import torch

    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (R, 1)
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already exceeds top_p (shifted right: top-1 kept).
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[:, 1:] = cumulative[:, :-1] > top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, -float("inf"))
    return logits


def row_seed(seed: int, image_index: int, sample_index: int) -> int:
    """The generator seed of one sample: depends only on seed + image index (so a list captioned
    in chunks gives the same samples when each chunk's seed is shifted by its offset)."""
    return hash((seed + image_index, sample_index)) & 0x7FFF_FFFF_FFFF_FFFF


def sample(
    model: ClipCaptionModel,
    prefix: torch.Tensor,
    num_samples: int,
    max_length: int,
    stop_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    image_ids: Sequence[int] | None = None,
) -> list[list[Hypothesis]]:
    """``num_samples`` sampled captions per image of ``prefix`` (B, K, E), best (mean log-prob) first.

    Each sample has its own ``torch.Generator`` seeded from (seed + image id, sample index), so
    a sample does not depend on which other images share the batch, nor on when they stop.
    ``image_ids`` default to 0..B-1 (pass the images' positions in a longer list to keep the
    samples independent of how the list is batched).
    """
    import torch

    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # follows torch.manual_seed
    n_images = prefix.shape[0]
    device = prefix.device
    ids = list(range(n_images)) if image_ids is None else list(image_ids)
    generators = []
    for i in ids:
        for j in range(num_samples):
            g = torch.Generator(device=device)
            g.manual_seed(row_seed(seed, i, j))
            generators.append(g)

    def choose(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)  # (A, V)
        # Exponential race: argmax(p / E), E ~ Exp(1) per token, is an exact draw from p.
        race = torch.stack([torch.empty(probs.shape[-1], device=device).exponential_(generator=generators[r])
                            for r in rows.tolist()])
        return (probs / race).argmax(-1)

    rows = _decode_rows(model, prefix.repeat_interleave(num_samples, dim=0), max_length, stop_id, choose, temperature)
    return [sorted(rows[i * num_samples : (i + 1) * num_samples], key=lambda h: -h[1]) for i in range(n_images)]


# --------------------------------------------------------------------------- entry points


def generate(
    model: ClipCaptionModel,
    prefix: torch.Tensor,
    options: DecodingOptions,
    stop_id: int,
    image_ids: Sequence[int] | None = None,
) -> list[list[Hypothesis]]:
    """Token-level decoding of prefixes (B, K, E): for each image, ``num_captions`` hypotheses,
    best first. ``image_ids`` only matter for sampling (see ``sample``)."""
    import torch

    positions = getattr(model.gpt.config, "n_positions", None)
    if positions is not None and prefix.shape[1] + options.max_length - 1 > positions:
        raise UsageError(
            f"max_length {options.max_length} does not fit GPT-2's {positions} positions after a "
            f"{prefix.shape[1]}-token prefix (at most {positions - prefix.shape[1] + 1})"
        )
    if prefix.shape[0] == 0:
        return []
    with torch.inference_mode():
        if options.strategy == "beam":
            found = beam_search(model, prefix, options.beam_size, options.max_length, stop_id, options.temperature)
        elif options.strategy == "sample":
            found = sample(model, prefix, options.num_captions, options.max_length, stop_id, options.temperature,
                           options.top_k, options.top_p, options.seed, image_ids)
        else:
            found = [[h] for h in greedy(model, prefix, options.max_length, stop_id)]
    return [hyps[: options.num_captions] for hyps in found]


def decode(
    model: ClipCaptionModel,
    tokenizer: Any,
    clip_embedding: torch.Tensor,
    options: DecodingOptions | None = None,
    image_ids: Sequence[int] | None = None,
    **overrides: Any,
) -> list[DecodingResult]:
    """Caption CLIP image embeddings (B, prefix_size): one ``DecodingResult`` per image.

    ``overrides`` are DecodingOptions fields applied on top of ``options``. A ``stop_token`` of
    None means the model config's. ``image_ids``: see ``sample``.
    """
    import torch

    options = (options or DecodingOptions()).replace(**overrides) if overrides else (options or DecodingOptions())
    with torch.inference_mode():
        prefix = model.embed_prefix(clip_embedding)  # (B, K, E)
    return decode_prefix(model, tokenizer, prefix, options, image_ids)


def decode_prefix(
    model: ClipCaptionModel,
    tokenizer: Any,
    prefix: torch.Tensor,
    options: DecodingOptions,
    image_ids: Sequence[int] | None = None,
) -> list[DecodingResult]:
    """Caption GPT-2 prefix embeddings (B, K, E) directly."""
    stop = options.stop_token or getattr(model.config, "stop_token", None) or "."
    found = generate(model, prefix, options, stop_token_id(tokenizer, stop), image_ids)
    results = []
    for hyps in found:
        texts = tuple(tokens_to_text(tokenizer, t) for t, _ in hyps)
        results.append(DecodingResult(text=texts[0], tokens=tuple(hyps[0][0]), score=hyps[0][1], texts=texts,
                                      scores=tuple(s for _, s in hyps)))
    return results
