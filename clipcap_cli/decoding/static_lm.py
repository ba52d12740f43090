"""A static KV cache and the step that feeds it, shared by every LM family (whisper's ``Inference``).

``StaticStepper`` holds what does not depend on the architecture: the cache preallocated for the
whole caption, the logical/physical row slots that ``select`` renumbers, the fixed-shape step and
its CUDA graphs (one per batch-size bucket, each checked against the eager step on its first
replay), the bf16/fp16 mixed-precision rules and the LM head with its fp32-refined top logits.
A family (``static_families.py``) says how its inputs are embedded (``_embed``), what one block
does (``_block``, handed an ``attend`` that writes the cache and attends over it), how the last
hidden state is finished (``_final``), and, for rotary positions, fills ``rope`` with the cos/sin
of every absolute position.

torch is imported inside functions, like the rest of the decoding core.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FIRST_POSITIONS = 24  # generated positions a CPU cache holds at first; it doubles (rarely) up to max_length
REFINED_LOGITS = 16  # bf16/fp16 LM head: each row's highest logits recomputed in fp32 (see StaticStepper._logits)
GRAPHED_ATTR = "_clipcap_graphed_steppers"  # where an LM keeps its CUDA-graphed stepper (one shape at a time)
GRAPHS_OFF_ATTR = "_clipcap_cuda_graphs_off"  # set on an LM whose graphs failed their check: eager from then on
GRAPH_TOLERANCE = {"float": 1e-3, "half": 2e-2}  # graphed vs eager logits: max |diff| / max(1, max |eager|)
log = logging.getLogger(__name__)

# attend(layer, q (N, H, T, D), k (N, KVH, T, D), v (N, KVH, T, D)) -> attention output (N, T, H * D)
Attend = Callable[[int, "torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class StaticStepper(abc.ABC):
    """An LM over a KV cache preallocated for the whole caption.

    Every row has the same length (the prefix has a fixed K, and each step adds one token to every
    row), so the eager step needs no mask or padding. Rows are *logical* (the decoder's order) and
    live in *physical* cache rows ``slot[row]``, a permutation of 0..n-1: ``select`` reorders beams
    and drops finished rows by renumbering, and copies only the rows whose history must be
    duplicated (a fork) or moved below n. The step runs in physical order; hidden states go back
    to logical order before the LM head.

    In bf16/fp16 the matrix products, attention and the cache are in that dtype, but the residual
    stream and the norms stay in fp32, as mixed-precision inference does: rounding the running sum
    to 8 bits after every block is what flips near-ties most. See also ``_logits``.

    A subclass sets, before calling ``__init__``: ``layers`` (count), ``n_head``, ``kv_heads``,
    ``head_dim``, ``width`` (the residual stream's), ``scales`` (per layer, SDPA's scale) and
    ``head`` (the LM head, a Linear); and implements ``_embed``, ``_block``, ``_final`` and
    ``_norm_modules``. A rotary family sets ``rope`` in ``_setup_rope``.
    """

    layers: int
    n_head: int
    kv_heads: int
    head_dim: int
    width: int
    scales: list[float]
    head: Any

    def __init__(self, lm: Any, rows: int, positions: int, cuda_graphs: bool = False):
        import torch

        self.lm = lm
        weight = lm.get_input_embeddings().weight
        self.dtype, self.device = weight.dtype, weight.device
        self.half = self.dtype in _half_dtypes()
        # The residual stream's dtype: fp32 under a bf16/fp16 model (see the class docstring).
        self.stream = torch.float32 if self.half else self.dtype
        self._norms = _float_norms(self._norm_modules()) if self.half else {}
        self.groups = self.n_head // self.kv_heads  # query heads per key/value head (grouped-query attention)
        # Rows and positions the cache is sized for. A graphed step has fixed shapes: rows are
        # padded up to a bucket, and attention covers every position under a mask.
        self.graphed = cuda_graphs
        self.capacity = _bucket(rows) if cuda_graphs else rows
        self.positions = positions
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), each (positions, D)
        self._setup_rope()
        self.kv: torch.Tensor | None = None  # (layers, 2, rows, kv heads, positions held, head_dim)
        self.n = 0  # rows now
        self.length = 0  # positions every row holds
        self.slot: torch.Tensor | None = None  # (n,) physical row of each logical row; None = the identity
        self._graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}  # bucket -> (graph, input, output)
        self._at: torch.Tensor | None = None  # (1,) the position being written, for the fixed-shape step
        self._visible: torch.Tensor | None = None  # (1, positions held): the positions 0.._at, for the fixed-shape step
        self._step_at = 0  # the position being written, for the eager step
        self._pool: Any = None
        # The graphed step: padded input (b, E) -> ``_fixed_blocks``'s output (b, E). On CUDA, a
        # captured graph's replay; None runs the fixed-shape step eagerly (the CPU). Tests inject
        # their own. Each bucket's first replay is checked against the eager step (``_checked``).
        self.replay: Callable[[torch.Tensor], torch.Tensor] | None = (
            self._replay_cuda if cuda_graphs and self.device.type == "cuda" else None
        )
        self._checked: set[int] = set()

    # ---- what a family provides (each family class in static_families.py defines the abstract four)

    def _setup_rope(self) -> None:
        """Rotary families fill ``self.rope``; the others have nothing to do."""

    @abc.abstractmethod
    def _norm_modules(self) -> list[Any]:
        """The family's LayerNorm/RMSNorm modules (kept in fp32 under a bf16/fp16 model)."""

    @abc.abstractmethod
    def _embed(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Input embeddings (N, T, E_in) at positions start.. -> the residual stream (N, T, E)."""

    @abc.abstractmethod
    def _block(self, i: int, x: torch.Tensor, rope: Any, attend: Attend) -> torch.Tensor:
        """Block ``i`` on the stream (N, T, E); ``rope``: (cos, sin) of the T positions, each (T, D), or None."""

    @abc.abstractmethod
    def _final(self, x: torch.Tensor) -> torch.Tensor:
        """The last norm (and projection) of the stream (n, E), kept in the stream's dtype."""

    # ---- the three calls

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        """Run the prefixes (R, K, E); logits (R, V) at the last position, in at least float32."""
        import torch

        rows, k, _ = prefix.shape
        if rows > self.capacity or k > self.positions:
            raise ValueError(
                f"prefill of {rows} rows x {k} positions exceeds the cache ({self.capacity} x {self.positions})"
            )
        held = self.positions if self.graphed else min(self.positions, k + FIRST_POSITIONS)
        if self.kv is None or not self.graphed:  # a graphed stepper keeps its cache: the graphs write into it
            # The eager step reads only written positions; the fixed-shape step gives the others a
            # zero weight, and 0 x (uninitialised NaN) would still be NaN, hence zeros there.
            new = torch.zeros if self.graphed else torch.empty
            shape = (self.layers, 2, self.capacity, self.kv_heads, held, self.head_dim)
            self.kv = new(*shape, dtype=self.dtype, device=self.device)
        x = self._embed(prefix, 0)  # (R, K, E)
        rope = None if self.rope is None else (self.rope[0][:k], self.rope[1][:k])
        for i in range(self.layers):
            x = self._block(i, x, rope, self._attend_prefill)
        self.n, self.length, self.slot = rows, k, None
        return self._logits(self._final(x[:, -1]))

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
        x = self._embed(embeds.unsqueeze(1), at)[:, 0]  # (n, E)
        if self.slot is not None:  # to physical order: x_phys[slot[j]] = x[j]
            x = x[torch.argsort(self.slot)]
        x = self._graphed_blocks(x, at) if self.graphed else self._blocks(x, at)
        self.length = at + 1
        if self.slot is not None:  # back to logical order
            x = x[self.slot]
        return self._logits(x)

    # ---- attention over the cache, one per kind of step

    def _attend_prefill(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The prefix's K positions attend causally to each other; they fill cache positions 0..K-1."""
        import torch.nn.functional as F

        rows, _, t, _ = q.shape
        self.kv[i, 0, :rows, :, :t] = k
        self.kv[i, 1, :rows, :, :t] = v
        if self.groups > 1:  # each key/value head serves ``groups`` consecutive query heads
            k, v = (z.repeat_interleave(self.groups, dim=1) for z in (k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scales[i])  # (R, H, K, D)
        return att.transpose(1, 2).reshape(rows, t, self.n_head * self.head_dim)

    def _attend_step(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new position ``_step_at`` of n rows attends to positions 0..at of its own row."""
        import torch.nn.functional as F

        n, at = q.shape[0], self._step_at
        self.kv[i, 0, :n, :, at : at + 1] = k
        self.kv[i, 1, :n, :, at : at + 1] = v
        # Grouped-query attention without copying the cache: a key/value head's query heads are its
        # ``groups`` queries (no mask: one new position sees every position before it).
        att = F.scaled_dot_product_attention(
            q.view(n, self.kv_heads, self.groups, self.head_dim),
            self.kv[i, 0, :n, :, : at + 1],
            self.kv[i, 1, :n, :, : at + 1],  # (n, KVH, at+1, D) views
            scale=self.scales[i],
        )  # (n, KVH, groups, D)
        return att.reshape(n, 1, self.n_head * self.head_dim)

    def _attend_fixed(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``_attend_step`` with fixed shapes: the position ``_at`` is a tensor, attention spans the
        whole cache under a mask."""
        import torch.nn.functional as F

        b = q.shape[0]
        self.kv[i, 0, :b].index_copy_(2, self._at, k)
        self.kv[i, 1, :b].index_copy_(2, self._at, v)
        att = F.scaled_dot_product_attention(
            q.view(b, self.kv_heads, self.groups, self.head_dim),
            self.kv[i, 0, :b],
            self.kv[i, 1, :b],
            attn_mask=self._visible,
            scale=self.scales[i],
        )  # (b, KVH, groups, D)
        return att.reshape(b, 1, self.n_head * self.head_dim)

    # ---- the blocks, eager and fixed-shape

    def _blocks(self, x: torch.Tensor, at: int) -> torch.Tensor:
        """Every block and the final norm for one new position ``at`` of n rows (n, E), attending to 0..at."""
        self._step_at = at
        rope = None if self.rope is None else (self.rope[0][at : at + 1], self.rope[1][at : at + 1])
        x = x.unsqueeze(1)
        for i in range(self.layers):
            x = self._block(i, x, rope, self._attend_step)
        return self._final(x[:, 0])

    def _fixed_blocks(self, x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """``_blocks`` with fixed shapes, so that a CUDA graph can replay it at any position: the
        position ``at`` (1,) is a tensor. x: (b, E) with b a bucket size; rows past n are padding
        and write unused cache rows."""
        import torch

        assert self.kv is not None
        self._at = at
        self._visible = (torch.arange(self.kv.shape[4], device=x.device) <= at)[None]  # (1, P): positions 0..at
        rope = None if self.rope is None else (self.rope[0].index_select(0, at), self.rope[1].index_select(0, at))
        x = x.unsqueeze(1)
        for i in range(self.layers):
            x = self._block(i, x, rope, self._attend_fixed)
        return self._final(x[:, 0])

    def _graphed_blocks(self, x: torch.Tensor, at: int) -> torch.Tensor:
        """``_fixed_blocks`` for n rows padded to a bucket; on CUDA replayed from a captured graph.

        The graphs check themselves: each bucket's first replay is compared with the eager step on
        the same input (``_check_replay``), and a mismatch, or any error capturing or replaying,
        turns the graphs off for the rest of the run (this model's later batches too) with one warning.
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
        self.lm.__dict__[GRAPHS_OFF_ATTR] = why
        self.lm.__dict__.pop(GRAPHED_ATTR, None)
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
        at = self._at
        static_in = torch.zeros(b, self.width, dtype=self.stream, device=self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # let lazy initialisations (cuBLAS handles, SDPA kernel choice) happen outside capture
                self._fixed_blocks(static_in, at)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every bucket's graph
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._fixed_blocks(static_in, at)
        self._graphs[b] = (graph, static_in, static_out)
        return self._graphs[b]

    # ---- precision

    def _norm(self, module: Any, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Norm ``module`` (LayerNorm or RMSNorm) of the residual stream, computed in the stream's dtype
        and given in ``dtype`` (default the model's: the input of a block's matrix products)."""
        if not self.half:
            return module(x)
        import torch
        import torch.nn.functional as F

        kind, weight, bias, eps = self._norms[id(module)]
        if kind == "layer":
            y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        else:  # RMSNorm: x / sqrt(mean(x^2) + eps), times the weight
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            y = y if weight is None else y * weight
        return y.to(dtype or self.dtype)

    def _heads(self, z: torch.Tensor, heads: int) -> torch.Tensor:
        """A projection (N, T, heads * D) as (N, heads, T, D) (a plain view when T = 1, the step)."""
        n, t = z.shape[:2]
        if t == 1:
            return z.view(n, heads, 1, self.head_dim)
        return z.view(n, t, heads, self.head_dim).transpose(1, 2)

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        """The stream as the input of a matrix product (the model's dtype)."""
        return x.to(self.dtype) if self.half else x

    def _rotate(self, z: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotary positions on queries or keys (N, heads, T, D): transformers' ``apply_rotary_pos_emb``
        (the rotation in fp32 under a bf16/fp16 model)."""
        import torch

        cos, sin = rope
        zf = z.float() if self.half else z
        half = zf.shape[-1] // 2
        rotated = torch.cat((-zf[..., half:], zf[..., :half]), dim=-1)
        return ((zf * cos) + (rotated * sin)).to(z.dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM head on (n, E) -> logits (n, V) in at least float32.

        In bf16/fp16 the head's output is rounded to 8 (or 11) bits, which flips near-ties that fp32
        would break the other way. Each row's ``REFINED_LOGITS`` highest logits are recomputed in
        fp32 from the same weights: on 64 random-weight images this took GPT-2's greedy agreement
        with fp32 from 48 to 53 identical captions, for 2% of the time (the full fp32 head costs 20%).
        """
        import torch

        head = self.head
        logits = head(h.to(self.dtype))
        if not self.half:
            return logits
        top = logits.topk(min(REFINED_LOGITS, logits.shape[-1]), dim=-1).indices  # (n, k)
        exact = torch.bmm(h.float().unsqueeze(1), head.weight[top].float().transpose(1, 2))[:, 0]  # (n, k)
        if head.bias is not None:
            exact = exact + head.bias[top].float()
        return logits.float().scatter_(1, top, exact)

    # ---- the cache

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


def _float_norms(modules: list[Any]) -> dict[int, tuple[str, Any, Any, float]]:
    """(kind, fp32 weight, fp32 bias, eps) of every norm, by module id (a few KB; made once per stepper)."""
    import torch

    def f32(t: Any) -> Any:
        return None if t is None else t.float()

    out = {}
    for m in modules:
        if isinstance(m, torch.nn.LayerNorm):
            out[id(m)] = ("layer", f32(m.weight), f32(m.bias), m.eps)
        else:  # transformers' RMSNorms keep eps as variance_epsilon (or eps)
            eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
            out[id(m)] = ("rms", f32(getattr(m, "weight", None)), None, eps)
    return out


def _half_dtypes() -> tuple[torch.dtype, ...]:
    import torch

    return (torch.bfloat16, torch.float16)
