"""Caption decoding: greedy, the original ClipCap beam search, and top-k/top-p sampling.

One stepping loop (``_run``) feeds GPT-2 one token per row over a KV cache (``inference.py``),
and a strategy (``_Beams``, or ``_Rows`` for greedy and sampling) reads the logits and says which
rows go on with which token, as whisper splits its Inference from its TokenDecoder. A batch of
images runs at once, and finished rows leave it. Greedy and beam search give the same tokens as
the original's ``generate2`` / ``generate_beam`` run one image at a time. torch is imported inside
functions; ``DecodingOptions`` lives in ``options.py`` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from clipcap_cli.config import EOS_STOP
from clipcap_cli.decoding.caption_text import clean_up_tokenization, stop_token_id, tokens_to_text  # noqa: F401 (re-exported)
from clipcap_cli.decoding.inference import open_inference

# What decoding is asked to do, re-exported: decode is where callers look for it.
from clipcap_cli.decoding.options import RERANK_SAMPLES as RERANK_SAMPLES
from clipcap_cli.decoding.options import RERANKERS as RERANKERS
from clipcap_cli.decoding.options import STRATEGIES as STRATEGIES
from clipcap_cli.decoding.options import DecodingOptions as DecodingOptions
from clipcap_cli.decoding.options import DecodingResult as DecodingResult
from clipcap_cli.decoding.options import Hypothesis as Hypothesis
from clipcap_cli.errors import UsageError

if TYPE_CHECKING:
    import torch

    from clipcap_cli.model import ClipCaptionModel

# --------------------------------------------------------------------------- the stepping loop


def _run(model: ClipCaptionModel, prefix: torch.Tensor, strategy: _Strategy, max_length: int, rows: int) -> Any:
    """Drive GPT-2 over a KV cache until ``strategy`` has ``max_length`` tokens per row or all rows stopped.

    ``prefix`` (R, K, E) is fed once; then each step the strategy reads the logits, records its
    choices and says which rows go on with which token, and the cache follows (``select``).
    ``rows`` is the most rows the cache must hold at once (R, or R x beams).
    """
    inference = open_inference(model.gpt, rows, prefix.shape[1] + max_length - 1)
    logits = inference.prefill(prefix)  # (R, V)
    for i in range(max_length):
        keep, tokens = strategy.update(logits)  # keep: (n',) rows that go on (None: all, in order); tokens: (n',)
        if i == max_length - 1 or tokens.numel() == 0:
            break
        if keep is not None:
            inference.select(keep)
        logits = inference.step(model.embed_tokens(tokens))  # (n', V)
    return strategy.finish()


class _Strategy(Protocol):
    def update(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]: ...

    def finish(self) -> Any: ...


def _score_dtype(logits: torch.Tensor) -> torch.dtype:
    """Log-probs and scores in at least float32, whatever the model's precision (bf16 logits included)."""
    import torch

    return torch.promote_types(logits.dtype, torch.float32)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) over the vocabulary (n, V), in at least float32."""
    import torch

    if temperature == 1.0:  # one fused pass, the cast included
        return torch.log_softmax(logits, -1, dtype=_score_dtype(logits))
    return (logits.to(_score_dtype(logits)) / temperature).log_softmax(-1)


def _topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=-1)`` for (n, V) rows with a small k, 4x faster on the CPU over GPT-2's vocabulary.

    The maxima of 64-wide chunks find the k best chunks, which hold the k best values; topk then
    runs over k x 64 values instead of V (measured at 80 rows: 1.7 ms instead of 7.8 ms). Only
    which of exactly equal values wins may differ from ``topk``'s own choice.
    """
    import torch

    n, v = x.shape
    chunk = 64
    if x.device.type != "cpu" or v < 64 * chunk * k:
        return x.topk(k, dim=-1)
    whole = v - v % chunk
    best_chunks = x[:, :whole].reshape(n, whole // chunk, chunk).amax(-1).topk(k, dim=-1).indices  # (n, k)
    columns = (best_chunks.unsqueeze(-1) * chunk + torch.arange(chunk, device=x.device)).view(n, k * chunk)
    if whole < v:  # the last, partial chunk is always a candidate
        columns = torch.cat((columns, torch.arange(whole, v, device=x.device).expand(n, -1)), dim=1)
    values, where = x.gather(1, columns).topk(k, dim=-1)
    return values, columns.gather(1, where)


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
    beams = _Beams(prefix.shape[0], beam_size, stop_id, temperature)
    return _run(model, prefix, beams, max_length, prefix.shape[0] * beam_size)


class _Beams:
    """The beam search strategy. State per active image a and beam b: tokens (A, W, T), summed
    log-probs ``scores`` (A, W), lengths (A, W) and ``stopped`` (A, W).

    Only beams that have not stopped are cache rows (a stopped beam's next token is always the
    free filler, so GPT-2 need not run for it), in row-major (image, beam) order.
    """

    def __init__(self, n_images: int, beam_size: int, stop_id: int, temperature: float):
        self.w, self.stop_id, self.temperature = beam_size, stop_id, temperature
        self.out: list[list[Hypothesis]] = [[] for _ in range(n_images)]
        self.images: torch.Tensor | None = None  # (A,) input image of each active image; None before step 1

    def update(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        w = self.w
        # The original's arithmetic exactly: softmax over the vocabulary, then log, so that its near-ties
        # break alike (log_softmax rounds differently) and an underflowed probability is log(0) = -inf.
        # Only the W kept values are logged: the log is monotone, so the W best are the same.
        probs = (logits.to(_score_dtype(logits)) / self.temperature).softmax(-1)  # (n, V), one row per live beam
        top_p, top_tokens = _topk(probs, w)  # (n, W): a beam's W best tokens are all it can contribute
        top_logp = top_p.log()
        if self.images is None:  # step 1: the W best first tokens of each image's single distribution
            self.images = torch.arange(probs.shape[0], device=probs.device)
            self.scores, next_tokens = top_logp, top_tokens  # (B, W)
            self.tokens = next_tokens.unsqueeze(-1)  # (B, W, 1)
            self.lengths = torch.ones_like(self.scores)
            self.stopped = next_tokens == self.stop_id
            source_rows = self.images[:, None].expand(-1, w)  # every beam continues its image's row
        else:
            source_rows, next_tokens = self._extend(top_logp, top_tokens)
        return self._next_rows(source_rows, next_tokens)

    def _extend(self, top_logp: torch.Tensor, top_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of the original's global top-W over (beam x vocabulary) for every image."""
        import torch

        n_active, w = self.scores.shape
        live = ~self.stopped  # (A, W); logits row r is the r-th live beam in row-major order
        rows = live.flatten().cumsum(0).view(n_active, w) - 1  # cache row of each live beam
        lengths = self.lengths + live.to(self.lengths.dtype)  # a stopped beam's filler does not count
        average = torch.full((n_active, w, w), -float("inf"), dtype=self.scores.dtype, device=self.scores.device)
        tokens = torch.zeros((n_active, w, w), dtype=top_tokens.dtype, device=top_tokens.device)
        average[live] = (self.scores[live].unsqueeze(-1) + top_logp) / lengths[live].unsqueeze(-1)
        tokens[live] = top_tokens
        # A stopped beam competes with its final average, extended by token 0 at no cost.
        average[..., 0][self.stopped] = self.scores[self.stopped] / lengths[self.stopped]
        average, flat = average.view(n_active, w * w).topk(w, dim=-1)  # (A, W), ranked by mean log-prob
        source = flat // w  # which beam each winner extends
        next_tokens = tokens.view(n_active, w * w).gather(1, flat)
        self.lengths = lengths.gather(1, source)
        self.tokens = torch.cat(
            (
                self.tokens.gather(1, source.unsqueeze(-1).expand(-1, -1, self.tokens.shape[-1])),
                next_tokens.unsqueeze(-1),
            ),
            dim=-1,
        )  # (A, W, T+1)
        self.stopped = self.stopped.gather(1, source) | (next_tokens == self.stop_id)
        self.scores = average * self.lengths  # back to summed log-probs, via the same float ops as the original
        return rows.gather(1, source), next_tokens

    def _next_rows(self, source_rows: torch.Tensor, next_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Finish the images whose beams all stopped; the live beams' (source rows, tokens)."""
        assert self.images is not None
        done = self.stopped.all(-1)  # (A,)
        if bool(done.any()):
            # Finished images leave the batch: the others decode exactly as if they were alone.
            for a in done.nonzero().flatten().tolist():
                self._finish_image(a)
            keep = (~done).nonzero().flatten()
            self.images, self.tokens, self.scores, self.lengths, self.stopped, source_rows, next_tokens = (
                t[keep]
                for t in (self.images, self.tokens, self.scores, self.lengths, self.stopped, source_rows, next_tokens)
            )
        live = ~self.stopped
        return source_rows[live], next_tokens[live]

    def _finish_image(self, a: int) -> None:
        """Image a's beams (W, T) -> (tokens truncated to their length, score / length), best first."""
        assert self.images is not None
        final = self.scores[a] / self.lengths[a]
        order = final.argsort(descending=True).tolist()
        lengths = self.lengths[a].long().tolist()
        rows = self.tokens[a].tolist()
        values = final.tolist()
        self.out[int(self.images[a])] = [(rows[j][: lengths[j]], float(values[j])) for j in order]

    def finish(self) -> list[list[Hypothesis]]:
        if self.images is not None:
            for a in range(self.images.shape[0]):
                self._finish_image(a)
        return self.out


# --------------------------------------------------------------------------- greedy and sampling


class _Rows:
    """Greedy and sampling: one token per row per step until the row emits the stop token (kept)
    or has max_length tokens. ``choose(logits (A, V), ids (A,))`` picks the next token of each
    active row; ``ids`` are the rows' indices in the batch. Scores are mean log-probs at ``temperature``.
    """

    def __init__(
        self,
        n_rows: int,
        max_length: int,
        stop_id: int,
        choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        temperature: float,
        device: torch.device,
    ):
        import torch

        self.stop_id, self.choose, self.temperature = stop_id, choose, temperature
        self.ids = torch.arange(n_rows, device=device)  # (A,) batch row of each active row
        self.tokens = torch.zeros(n_rows, max_length, dtype=torch.long, device=device)
        self.lengths = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.logps: torch.Tensor | None = None  # (R, max_length), in the scores' dtype
        self.t = 0

    def update(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        import torch

        next_tokens = self.choose(logits, self.ids)  # (A,)
        token_logp = _log_probs(logits, self.temperature).gather(1, next_tokens[:, None])[:, 0]
        if self.logps is None:
            self.logps = torch.zeros(self.tokens.shape, dtype=token_logp.dtype, device=token_logp.device)
        self.tokens[self.ids, self.t] = next_tokens
        self.logps[self.ids, self.t] = token_logp
        self.t += 1
        self.lengths[self.ids] = self.t
        finished = next_tokens == self.stop_id
        if not bool(finished.any()):
            return None, next_tokens
        keep = (~finished).nonzero().flatten()
        self.ids = self.ids[keep]
        return keep, next_tokens[keep]

    def finish(self) -> list[Hypothesis]:
        assert self.logps is not None
        scores = (self.logps.sum(-1) / self.lengths).tolist()  # unwritten positions hold 0
        lengths = self.lengths.tolist()
        return [(row[:n], score) for row, n, score in zip(self.tokens.tolist(), lengths, scores)]


def _decode_rows(
    model: ClipCaptionModel,
    prefix: torch.Tensor,
    max_length: int,
    stop_id: int,
    choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    temperature: float,
) -> list[Hypothesis]:
    """One (tokens, mean log-prob) per row of ``prefix`` (R, K, E), picking tokens with ``choose``."""
    rows = _Rows(prefix.shape[0], max_length, stop_id, choose, temperature, prefix.device)
    return _run(model, prefix, rows, max_length, prefix.shape[0])


def greedy(model: ClipCaptionModel, prefix: torch.Tensor, max_length: int, stop_id: int) -> list[Hypothesis]:
    """The original ``generate2``: argmax each step (its top-p filter never changes the argmax),
    stop after the stop token (kept). One (tokens, mean log-prob) per row of ``prefix`` (B, K, E)."""
    # max(), not argmax(): the same first maximum, and 2x faster over GPT-2's vocabulary on the CPU.
    return _decode_rows(model, prefix, max_length, stop_id, lambda logits, rows: logits.max(-1).indices, 1.0)


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
        probs = filter_logits(logits.to(_score_dtype(logits)) / temperature, top_k, top_p).softmax(-1)  # (A, V)
        # Exponential race: argmax(p / E), E ~ Exp(1) per token, is an exact draw from p.
        race = torch.stack(
            [torch.empty(probs.shape[-1], device=device).exponential_(generator=generators[r]) for r in rows.tolist()]
        )
        return (probs / race).argmax(-1)

    rows = _decode_rows(model, prefix.repeat_interleave(num_samples, dim=0), max_length, stop_id, choose, temperature)
    return [sorted(rows[i * num_samples : (i + 1) * num_samples], key=lambda h: -h[1]) for i in range(n_images)]


# --------------------------------------------------------------------------- entry points


# Images per batch on the CPU, measured with benchmarks/bench_batch.py (decoding only, images/s):
#   1 thread,  batch 8/16/32/64/128: greedy 3.1/6.5/8.9/12.9/14.0; beam 5 2.4/3.3/3.5/3.7 (8..64)
#   2 threads, batch 16/32/64/128/256: greedy 12.1/15.9/20.4/24.4/24.8; beam 5 4.6/5.5/5.5 (16..64)
# Beam 5 levels off at 32. Greedy gains 20% more at 128 with 2 threads (under 10% with CLIP included),
# for twice the memory and the wait for the first caption; 64 keeps those down.
CPU_BATCH_SIZE = {"greedy": 64, "beam": 32, "sample": 64}
CUDA_MAX_BATCH_SIZE = 1024  # CUDA: a batch large enough to fill an H200; more only costs memory


def default_batch_size(
    device: torch.device | str, options: DecodingOptions | None = None, model: ClipCaptionModel | None = None
) -> int:
    """Images per CLIP + decoding batch that keep ``device`` busy, for the CLI's --batch-size default.

    CPU: the batch sizes measured on a 2-core Xeon (CPU_BATCH_SIZE): GEMMs over fewer than ~64
    rows leave the cores waiting on GPT-2's weights. CUDA: the largest power
    of two whose KV cache and logits take at most half the free memory (``model`` gives GPT-2's
    sizes; GPT-2 124M is assumed without it), capped at CUDA_MAX_BATCH_SIZE.
    """
    import torch

    options = options or DecodingOptions()
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_BATCH_SIZE[options.strategy]
    rows = options.beam_size if options.strategy == "beam" else options.num_captions  # rows per image
    config = model.gpt.config if model is not None else None
    if config is not None:
        from clipcap_cli.weights.lm import hidden_size

        layers = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
        width, vocab = hidden_size(config), config.vocab_size
    else:
        layers, width, vocab = 12, 768, 50257
    prefix = model.prefix_length if model is not None else 10
    element = next(model.gpt.parameters()).element_size() if model is not None else 4
    cache = layers * 2 * width * (prefix + options.max_length) * element  # one row's keys and values
    logits = vocab * 4 * 4  # fp32 logits, log-probs and two temporaries
    per_image = rows * (cache + logits + 16 * width * 4 * element)  # + activations of one step
    free, _ = torch.cuda.mem_get_info(device)
    fits = max(1, int(free // 2 // per_image))
    return min(CUDA_MAX_BATCH_SIZE, 1 << (fits.bit_length() - 1))


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

    from clipcap_cli.weights.lm import max_positions

    positions = max_positions(model.gpt.config)
    if positions is not None and prefix.shape[1] + options.max_length - 1 > positions:
        raise UsageError(
            f"max_length {options.max_length} does not fit the LM's {positions} positions after a "
            f"{prefix.shape[1]}-token prefix (at most {positions - prefix.shape[1] + 1})"
        )
    if prefix.shape[0] == 0:
        return []
    with torch.inference_mode():
        if options.strategy == "beam":
            found = beam_search(model, prefix, options.beam_size, options.max_length, stop_id, options.temperature)
        elif options.strategy == "sample":
            found = sample(
                model,
                prefix,
                options.num_captions,
                options.max_length,
                stop_id,
                options.temperature,
                options.top_k,
                options.top_p,
                options.seed,
                image_ids,
            )
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
    """Caption LM prefix embeddings (B, K, E) directly. With the end-of-text stop ("eos") the final
    end-of-text token stays in ``tokens`` but not in the text."""
    stop = options.stop_token or getattr(model.config, "stop_token", None) or "."
    stop_id = stop_token_id(tokenizer, stop)
    found = generate(model, prefix, options, stop_id, image_ids)
    hidden = stop_id if stop == EOS_STOP else None
    results = []
    for hyps in found:
        texts = tuple(tokens_to_text(tokenizer, t[:-1] if t and t[-1] == hidden else t) for t, _ in hyps)
        results.append(
            DecodingResult(
                text=texts[0],
                tokens=tuple(hyps[0][0]),
                score=hyps[0][1],
                texts=texts,
                scores=tuple(s for _, s in hyps),
                all_tokens=tuple(tuple(t) for t, _ in hyps),
            )
        )
    return results
