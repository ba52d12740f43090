"""GPT-2 stepping for caption decoding: a static KV cache and the step that feeds it (whisper's ``Inference``).

The decoding loop in ``decoding.py`` makes three calls: ``prefill(prefix)`` runs the image prefixes,
``select(rows)`` says which current row each next row continues (a beam reorder, finished rows
dropped), and ``step(embeds)`` feeds one new token per row. ``open_inference`` picks one of two:

- ``StaticGPT2`` for transformers' own ``GPT2LMHeadModel``: our own step over the model's modules,
  and a cache preallocated for the whole caption. ``select`` moves only the rows that must move (a
  beam that forks, a surviving row that fills a hole), instead of gathering the whole cache. On
  CUDA the step can be captured in CUDA graphs (one per batch-size bucket; unverified here).
- ``ForwardStepper`` for anything else GPT-2-like: the model's ``forward`` with transformers'
  ``DynamicCache``, and the cache length checked after every step, so a model that ignores the
  cache fails loudly instead of decoding one token at a time without context.

torch and transformers are imported inside functions, like the rest of the decoding core.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from clipcap_cli.errors import ClipCapError

if TYPE_CHECKING:
    import torch

FIRST_POSITIONS = 24  # generated positions a CPU cache holds at first; it doubles (rarely) up to max_length
REFINED_LOGITS = 16  # bf16/fp16 LM head: each row's highest logits recomputed in fp32 (see StaticGPT2._logits)
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
GRAPHED_ATTR = "_clipcap_graphed_steppers"  # where a GPT-2 keeps its CUDA-graphed stepper (one shape at a time)
GRAPHS_OFF_ATTR = "_clipcap_cuda_graphs_off"  # set on a GPT-2 whose graphs failed their check: eager from then on
GRAPH_TOLERANCE = {"float": 1e-3, "half": 2e-2}  # graphed vs eager logits: max |diff| / max(1, max |eager|)
log = logging.getLogger(__name__)


def open_inference(gpt: Any, rows: int, positions: int, cuda_graphs: bool | None = None) -> StaticGPT2 | ForwardStepper:
    """The stepper for ``gpt``: at most ``rows`` rows at once, at most ``positions`` positions per row.

    ``cuda_graphs``: capture the step in CUDA graphs; None = on CUDA devices only. (True on the CPU
    runs the same fixed-shape step eagerly, which is how the tests check it.) A graphed stepper is
    kept with its cache and graphs for the next batch of the same shape: capturing costs more than
    a batch's decoding, and the graphs replay into that very cache.
    """
    if not is_stock_gpt2(gpt):
        return ForwardStepper(gpt)
    if cuda_graphs is None:
        cuda_graphs = gpt.transformer.wte.weight.device.type == "cuda"
    if not cuda_graphs or GRAPHS_OFF_ATTR in gpt.__dict__:  # graphs that failed their check stay off
        return StaticGPT2(gpt, rows, positions)
    key = (_bucket(rows), positions, gpt.transformer.wte.weight.dtype, gpt.transformer.wte.weight.device)
    kept = gpt.__dict__.setdefault(GRAPHED_ATTR, {})  # owned by the model: it goes when the model goes
    if key not in kept:
        kept.clear()  # one shape at a time: each holds a cache as large as the batch's
        kept[key] = StaticGPT2(gpt, rows, positions, cuda_graphs=True)
    return kept[key]


def is_stock_gpt2(gpt: Any) -> bool:
    """Whether ``gpt`` computes exactly what transformers' GPT-2 does, so our own step may replace its forward.

    A subclass that overrides ``forward`` (or a block), or cross-attention, takes the generic path:
    our step would silently skip what the override does.
    """
    try:
        from transformers.models.gpt2 import modeling_gpt2 as hf
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if not isinstance(gpt, hf.GPT2LMHeadModel) or type(gpt).forward is not hf.GPT2LMHeadModel.forward:
        return False
    if type(gpt.transformer) is not hf.GPT2Model or getattr(gpt.config, "add_cross_attention", False):
        return False
    return all(
        type(b) is hf.GPT2Block and type(b.attn) is hf.GPT2Attention and type(b.mlp) is hf.GPT2MLP
        for b in gpt.transformer.h
    )


# --------------------------------------------------------------------------- the static cache


class StaticGPT2:
    """GPT-2 over a KV cache preallocated for the whole caption.

    Every row has the same length (the prefix has a fixed K, and each step adds one token to every
    row), so the eager step needs no mask or padding. Rows are *logical* (the decoder's order) and
    live in *physical* cache rows ``slot[row]``, a permutation of 0..n-1: ``select`` reorders beams
    and drops finished rows by renumbering, and copies only the rows whose history must be
    duplicated (a fork) or moved below n. The step runs in physical order; hidden states go back
    to logical order before the LM head.

    Math is transformers' GPT-2 (its own LayerNorm, Conv1D and activation modules, SDPA with its
    scale). In bf16/fp16 the matrix products, attention and the cache are in that dtype, but the
    residual stream and the LayerNorms stay in fp32, as mixed-precision inference does: rounding
    the running sum to 8 bits after every block is what flips near-ties most. The tanh GELU is
    then PyTorch's fused one, and see ``_logits``.
    """

    def __init__(self, gpt: Any, rows: int, positions: int, cuda_graphs: bool = False):
        import torch

        self.gpt = gpt
        self.blocks = list(gpt.transformer.h)
        config = gpt.config
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scales = [_attention_scale(b.attn, config, i) for i, b in enumerate(self.blocks)]
        weight = gpt.transformer.wte.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.half = self.dtype in _half_dtypes()
        # The residual stream's dtype: fp32 under a bf16/fp16 model (see the class docstring).
        self.stream = torch.float32 if self.half else self.dtype
        self._norms = _float_norms(gpt) if self.half else {}
        self.fused_gelu = self.half and getattr(config, "activation_function", "") in TANH_GELUS
        # Rows and positions the cache is sized for. A graphed step has fixed shapes: rows are
        # padded up to a bucket, and attention covers every position under a mask.
        self.graphed = cuda_graphs
        self.capacity = _bucket(rows) if cuda_graphs else rows
        self.positions = positions
        self.kv: torch.Tensor | None = None  # (layers, 2, rows, heads, positions held, head_dim)
        self.n = 0  # rows now
        self.length = 0  # positions every row holds
        self.slot: torch.Tensor | None = None  # (n,) physical row of each logical row; None = the identity
        self._graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}  # bucket -> (graph, input, output)
        self._at: torch.Tensor | None = None  # (1,) the position being written, for the fixed-shape step
        self._pool: Any = None
        # The graphed step: padded input (b, E) -> ``_fixed_blocks``'s output (b, E). On CUDA, a
        # captured graph's replay; None runs the fixed-shape step eagerly (the CPU). Tests inject
        # their own. Each bucket's first replay is checked against the eager step (``_checked``).
        self.replay: Callable[[torch.Tensor], torch.Tensor] | None = (
            self._replay_cuda if cuda_graphs and self.device.type == "cuda" else None
        )
        self._checked: set[int] = set()

    # ---- the three calls

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        """Run the prefixes (R, K, E); logits (R, V) at the last position, in at least float32."""
        import torch
        import torch.nn.functional as F

        rows, k, e = prefix.shape
        if rows > self.capacity or k > self.positions:
            raise ValueError(
                f"prefill of {rows} rows x {k} positions exceeds the cache ({self.capacity} x {self.positions})"
            )
        held = self.positions if self.graphed else min(self.positions, k + FIRST_POSITIONS)
        if self.kv is None or not self.graphed:  # a graphed stepper keeps its cache: the graphs write into it
            # The eager step reads only written positions; the fixed-shape step gives the others a
            # zero weight, and 0 x (uninitialised NaN) would still be NaN, hence zeros there.
            new = torch.zeros if self.graphed else torch.empty
            self.kv = new(
                len(self.blocks),
                2,
                self.capacity,
                self.n_head,
                held,
                self.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
        x = prefix.to(self.stream) + self.gpt.transformer.wpe.weight[:k].to(self.stream)  # (R, K, E)
        for i, block in enumerate(self.blocks):
            q, key, value = (
                t.view(rows, k, self.n_head, self.head_dim).transpose(1, 2)
                for t in block.attn.c_attn(self._norm(block.ln_1, x)).split(e, dim=-1)
            )  # 3 x (R, H, K, D)
            self.kv[i, 0, :rows, :, :k] = key
            self.kv[i, 1, :rows, :, :k] = value
            att = F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=self.scales[i])  # (R, H, K, D)
            x = x + block.attn.c_proj(att.transpose(1, 2).reshape(rows, k, e)).to(self.stream)
            x = x + self._mlp(block, x)
        self.n, self.length, self.slot = rows, k, None
        return self._logits(self._final_norm(x[:, -1]))

    def select(self, rows: torch.Tensor) -> None:
        """Next row j continues current row ``rows[j]`` (repeats fork a row, absent rows are dropped)."""
        import torch

        m = rows.numel()
        if m > self.capacity:
            raise ValueError(f"{m} rows exceed the cache's {self.capacity}")
        source = rows if self.slot is None else self.slot[rows]  # (m,) physical rows of the sources
        # The first row continuing a source keeps its physical row if that lies below m; the
        # others (forks, and rows stranded at or above m) move into the free physical rows below m.
        order = torch.argsort(source, stable=True)
        first_sorted = torch.ones(m, dtype=torch.bool, device=rows.device)
        first_sorted[1:] = source[order[1:]] != source[order[:-1]]
        first = torch.empty_like(first_sorted)
        first[order] = first_sorted
        stays = first & (source < m)
        taken = torch.zeros(m, dtype=torch.bool, device=rows.device)
        taken[source[stays]] = True
        free = (~taken).nonzero().flatten()  # as many as the rows that move
        movers = (~stays).nonzero().flatten()
        slot = source.clone()
        slot[movers] = free
        if movers.numel():
            self._copy_rows(source[movers], free)
        self.n = m
        self.slot = None if bool(torch.equal(slot, torch.arange(m, device=slot.device))) else slot

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, embeddings (n, E); logits (n, V) in at least float32."""
        import torch

        assert self.kv is not None
        at = self.length
        if at >= self.positions:
            raise ValueError(f"the cache holds {self.positions} positions")
        if at >= self.kv.shape[4]:
            self._grow()
        x = embeds.to(self.stream) + self.gpt.transformer.wpe.weight[at].to(self.stream)  # (n, E)
        if self.slot is not None:  # to physical order: x_phys[slot[j]] = x[j]
            x = x[torch.argsort(self.slot)]
        x = self._graphed_blocks(x, at) if self.graphed else self._blocks(x, at)
        self.length = at + 1
        if self.slot is not None:  # back to logical order
            x = x[self.slot]
        return self._logits(x)

    # ---- the pieces

    def _blocks(self, x: torch.Tensor, at: int) -> torch.Tensor:
        """The 12 blocks and ln_f for one new position ``at`` of n rows (n, E), attending to 0..at."""
        import torch.nn.functional as F

        n, e = x.shape
        for i, block in enumerate(self.blocks):
            q, key, value = block.attn.c_attn(self._norm(block.ln_1, x)).split(e, dim=-1)  # 3 x (n, E)
            self.kv[i, 0, :n, :, at] = key.view(n, self.n_head, self.head_dim)
            self.kv[i, 1, :n, :, at] = value.view(n, self.n_head, self.head_dim)
            att = F.scaled_dot_product_attention(
                q.view(n, self.n_head, 1, self.head_dim),
                self.kv[i, 0, :n, :, : at + 1],
                self.kv[i, 1, :n, :, : at + 1],  # (n, H, at+1, D) views
                scale=self.scales[i],
            )  # (n, H, 1, D)
            x = x + block.attn.c_proj(att.view(n, e)).to(self.stream)
            x = x + self._mlp(block, x)
        return self._final_norm(x)

    def _fixed_blocks(self, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """``_blocks`` with fixed shapes, so that a CUDA graph can replay it at any position: the
        position ``at`` (1,) is a tensor, and attention spans the whole cache under a mask.
        x: (b, E) with b a bucket size; rows past n are padding and write unused cache rows."""
        import torch
        import torch.nn.functional as F

        assert self.kv is not None
        b, e = x.shape
        visible = (torch.arange(self.kv.shape[4], device=x.device) <= at)[None]  # (1, P): positions 0..at
        for i, block in enumerate(self.blocks):
            q, key, value = block.attn.c_attn(self._norm(block.ln_1, x)).split(e, dim=-1)  # 3 x (b, E)
            self.kv[i, 0, :b].index_copy_(2, at, key.view(b, self.n_head, 1, self.head_dim))
            self.kv[i, 1, :b].index_copy_(2, at, value.view(b, self.n_head, 1, self.head_dim))
            att = F.scaled_dot_product_attention(
                q.view(b, self.n_head, 1, self.head_dim),
                self.kv[i, 0, :b],
                self.kv[i, 1, :b],
                attn_mask=visible,
                scale=self.scales[i],
            )  # (b, H, 1, D)
            x = x + block.attn.c_proj(att.view(b, e)).to(self.stream)
            x = x + self._mlp(block, x)
        return self._final_norm(x)

    def _graphed_blocks(self, x: torch.Tensor, at: int) -> torch.Tensor:
        """``_fixed_blocks`` for n rows padded to a bucket; on CUDA replayed from a captured graph.

        The graphs are unverified on a GPU (none was available where this was written), so they
        check themselves: each bucket's first replay is compared with the eager step on the same
        input (``_check_replay``), and a mismatch, or any error capturing or replaying, turns the
        graphs off for the rest of the run (this model's later batches too) with one warning.
        """
        import torch

        n = x.shape[0]
        b = min(_bucket(n), self.capacity)
        if self._at is None:
            self._at = torch.zeros(1, dtype=torch.long, device=x.device)
        self._at.fill_(at)
        padded = torch.zeros(b, x.shape[1], dtype=x.dtype, device=x.device)
        padded[:n] = x
        if self.replay is None:
            return self._fixed_blocks(padded, self._at)[:n]
        try:
            out = self.replay(padded)
        except Exception as exc:  # noqa: BLE001 - any capture or replay failure: the eager step is always right
            self._graphs_off(f"capturing or replaying it failed ({type(exc).__name__}: {exc})")
            return self._fixed_blocks(padded, self._at)[:n]
        if b not in self._checked:
            eager = self._fixed_blocks(padded, self._at)  # rewrites the cache at ``at`` with the eager values
            problem = self._check_replay(out[:n], eager[:n])
            if problem:
                self._graphs_off(problem)
                return eager[:n]
            self._checked.add(b)
        return out[:n]

    def _check_replay(self, graphed: torch.Tensor, eager: torch.Tensor) -> str | None:
        """Why the graphed step's logits disagree with the eager step's (None: they agree)."""
        a, b = self._logits(graphed).float(), self._logits(eager).float()
        scale = max(1.0, float(b.abs().max()))
        diff = float((a - b).abs().max())
        tolerance = GRAPH_TOLERANCE["half" if self.half else "float"] * scale
        if not diff <= tolerance:  # NaN included
            return f"its logits differ from the eager step's by {diff:.3g} (tolerance {tolerance:.3g})"
        return None

    def _graphs_off(self, why: str) -> None:
        """Run the eager step from now on, for this stepper and every later one of this model."""
        self.replay = None
        self._graphs.clear()
        self.gpt.__dict__[GRAPHS_OFF_ATTR] = why
        self.gpt.__dict__.pop(GRAPHED_ATTR, None)
        log.warning(f"CUDA graphs turned off, decoding runs the eager step: the graphed step failed its check, {why}")

    def _replay_cuda(self, padded: torch.Tensor) -> torch.Tensor:
        """Replay bucket ``padded.shape[0]``'s graph (captured on first use) on ``padded``."""
        b = padded.shape[0]
        graph, static_in, static_out = self._graphs.get(b) or self._capture(b)
        static_in.copy_(padded)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, b: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Capture ``_fixed_blocks`` for bucket ``b`` (CUDA only). Warm-up runs write rows < b at
        position ``at``, which the real step overwrites right after."""
        import torch

        assert self._at is not None
        static_in = torch.zeros(b, self.n_head * self.head_dim, dtype=self.stream, device=self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # let lazy initialisations (cuBLAS handles, SDPA kernel choice) happen outside capture
                self._fixed_blocks(static_in, self._at)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every bucket's graph
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._fixed_blocks(static_in, self._at)
        self._graphs[b] = (graph, static_in, static_out)
        return self._graphs[b]

    def _mlp(self, block: Any, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        mlp = block.mlp
        h = mlp.c_fc(self._norm(block.ln_2, x))
        # bf16/fp16: PyTorch's fused tanh GELU is the same formula as GPT-2's gelu_new in one
        # kernel (2x faster in bf16 on the CPU); fp32 keeps transformers' own module.
        h = F.gelu(h, approximate="tanh") if self.fused_gelu else mlp.act(h)
        return mlp.c_proj(h).to(self.stream)

    def _norm(self, ln: Any, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """LayerNorm ``ln`` of the residual stream, computed in the stream's dtype and given in
        ``dtype`` (default GPT-2's: the input of a block's matrix products)."""
        if not self.half:
            return ln(x)
        import torch.nn.functional as F

        weight, bias = self._norms[id(ln)]
        return F.layer_norm(x, ln.normalized_shape, weight, bias, ln.eps).to(dtype or self.dtype)

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """ln_f, kept in the stream's dtype: ``_logits`` refines the top logits from it in fp32."""
        return self._norm(self.gpt.transformer.ln_f, x, self.stream)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head on (n, E) -> logits (n, V) in at least float32.

        In bf16/fp16 the head's output is rounded to 8 (or 11) bits, which flips near-ties that fp32
        would break the other way. Each row's ``REFINED_LOGITS`` highest logits are recomputed in
        fp32 from the same weights: on 64 random-weight images this took greedy agreement with fp32
        from 48 to 53 identical captions, for 2% of the time (the full fp32 head costs 20%).
        """
        import torch

        head = self.gpt.lm_head
        logits = head(h.to(self.dtype))
        if not self.half:
            return logits
        top = logits.topk(min(REFINED_LOGITS, logits.shape[-1]), dim=-1).indices  # (n, k)
        exact = torch.bmm(h.float().unsqueeze(1), head.weight[top].float().transpose(1, 2))[:, 0]  # (n, k)
        if head.bias is not None:
            exact = exact + head.bias[top].float()
        return logits.float().scatter_(1, top, exact)

    def _copy_rows(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy the cached history (all layers, positions so far) of physical rows ``source`` to ``target``."""
        assert self.kv is not None
        held = self.kv[:, :, :, :, : self.length]  # (layers, 2, rows, H, length, D)
        if held.device.type != "cpu":
            held[:, :, target] = held[:, :, source]  # one gather and one scatter kernel
        else:
            # On the CPU, one strided copy per row is 4x faster than index + index_put (measured:
            # 12 ms against 50 ms for 40 rows x 20 positions of GPT-2 124M), and needs no temporary.
            for s, t in zip(source.tolist(), target.tolist()):
                held[:, :, t].copy_(held[:, :, s])

    def _grow(self) -> None:
        """Double the positions the cache holds (up to ``positions``): a copy every few steps at most."""
        import torch

        assert self.kv is not None
        old = self.kv
        size = min(self.positions, 2 * old.shape[4])
        self.kv = torch.empty(*old.shape[:4], size, old.shape[5], dtype=old.dtype, device=old.device)
        self.kv[:, :, : self.n, :, : self.length] = old[:, :, : self.n, :, : self.length]


def _bucket(rows: int) -> int:
    """Rows padded for a graphed step: the next of 8, 12, 16, 24, 32, 48, ... (powers of two and
    1.5x them), so at most a third of a step is padding and few graphs are captured."""
    if rows <= 8:
        return 8
    power = 1 << (rows - 1).bit_length()
    return 3 * power // 4 if rows <= 3 * power // 4 else power


def _float_norms(gpt: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """fp32 copies of every LayerNorm's weight and bias, by module id (a few KB; made once per stepper)."""
    norms = [m for b in gpt.transformer.h for m in (b.ln_1, b.ln_2)] + [gpt.transformer.ln_f]
    return {id(m): (m.weight.float(), None if m.bias is None else m.bias.float()) for m in norms}


def _half_dtypes() -> tuple[torch.dtype, ...]:
    import torch

    return (torch.bfloat16, torch.float16)


def _attention_scale(attn: Any, config: Any, layer: int) -> float:
    """GPT-2's attention scale: 1/sqrt(head_dim) (scale_attn_weights), divided by layer+1 if configured."""
    if hasattr(attn, "scaling"):  # transformers 5 precomputes it
        return float(attn.scaling)
    scale = (config.n_embd // config.n_head) ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)
    return scale


# --------------------------------------------------------------------------- the generic path


@functools.cache
def forward_kwargs(forward_cls: type) -> tuple[str, bool]:
    """(name of the cache argument, whether ``logits_to_keep`` exists) for a GPT-2 class.

    transformers 5.x renamed ``past_key_values`` to ``cache``; older versions swallow an unknown
    ``cache=`` in ``**kwargs`` and silently recompute without it, so the name is read from the
    signature instead of guessed. A name this misses is caught by ``ForwardStepper``'s length check.
    """
    params = inspect.signature(forward_cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


class CacheIgnoredError(ClipCapError):
    """GPT-2's forward did not use the KV cache it was given (a renamed argument): captions would be wrong."""


class ForwardStepper:
    """Any GPT-2-like model through its own ``forward`` and transformers' ``DynamicCache``."""

    def __init__(self, gpt: Any):
        self.gpt = gpt
        self.cache_kw, self.has_keep = forward_kwargs(type(gpt))
        self.cache = _new_dynamic_cache(gpt.config)
        self.dtype = gpt.get_input_embeddings().weight.dtype
        self.length = 0

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        """Run the prefixes (R, K, E); logits (R, V) at the last position."""
        return self._forward(prefix)

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, embeddings (n, E); logits (n, V)."""
        return self._forward(embeds.unsqueeze(1))

    def select(self, rows: torch.Tensor) -> None:
        """Next row j continues current row ``rows[j]``."""
        self.cache.batch_select_indices(rows)

    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        import torch

        rows, new = embeds.shape[:2]
        positions = torch.arange(self.length, self.length + new, device=embeds.device).expand(rows, new)
        kwargs: dict[str, Any] = {self.cache_kw: self.cache, "use_cache": True, "position_ids": positions}
        if self.has_keep:
            kwargs["logits_to_keep"] = 1  # only the last position's logits: saves K-1 LM-head products
        logits = self.gpt(inputs_embeds=embeds.to(self.dtype), **kwargs).logits
        self.length += new
        held = self.cache.get_seq_length()
        if held != self.length:
            raise CacheIgnoredError(
                f"{type(self.gpt).__name__}.forward ignored the KV cache passed as {self.cache_kw}= (it holds {held} "
                f"positions, {self.length} expected): this transformers version names the argument differently, "
                "and captions would be decoded without context"
            )
        return logits[:, -1]


def _new_dynamic_cache(config: Any) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # versions whose DynamicCache takes no config
        return DynamicCache()
