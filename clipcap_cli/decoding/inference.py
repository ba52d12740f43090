"""LM stepping for caption decoding: a static KV cache and the step that feeds it (whisper's ``Inference``).

The decoding loop in ``decoding.py`` makes three calls: ``prefill(prefix)`` runs the image prefixes,
``select(rows)`` says which current row each next row continues (a beam reorder, finished rows
dropped), and ``step(embeds)`` feeds one new token per row. ``open_inference`` picks one of two:

- a static stepper (``static_lm.StaticStepper``) for transformers' own GPT-2, Llama-style (Llama,
  Qwen2, SmolLM2) and OPT causal LMs (``static_families.py``): our own step over the model's
  modules, and a cache preallocated for the whole caption. ``select`` moves only the rows that
  must move (a beam that forks, a surviving row that fills a hole), instead of gathering the whole
  cache. On CUDA the step can be captured in CUDA graphs (one per batch-size bucket, self-checked).
- ``ForwardStepper`` for anything else: the model's ``forward`` with transformers'
  ``DynamicCache``, and the cache length checked after every step, so a model that ignores the
  cache fails loudly instead of decoding one token at a time without context.

torch and transformers are imported inside functions, like the rest of the decoding core.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

from clipcap_cli.decoding.static_families import (  # noqa: F401 - re-exported: callers and tests import them from here
    StaticGPT2,
    StaticLlama,
    StaticOPT,
    is_stock_gpt2,
    is_stock_llama,
    is_stock_opt,
    static_class,
)
from clipcap_cli.decoding.static_lm import (  # noqa: F401 - re-exported
    FIRST_POSITIONS,
    GRAPH_TOLERANCE,
    GRAPHED_ATTR,
    GRAPHS_OFF_ATTR,
    REFINED_LOGITS,
    StaticStepper,
    _bucket,
)
from clipcap_cli.errors import ClipCapError

if TYPE_CHECKING:
    import torch


def open_inference(
    gpt: Any, rows: int, positions: int, cuda_graphs: bool | None = None
) -> StaticStepper | ForwardStepper:
    """The stepper for the causal LM ``gpt``: at most ``rows`` rows at once, at most ``positions`` per row.

    ``cuda_graphs``: capture the step in CUDA graphs; None = on CUDA devices only. (True on the CPU
    runs the same fixed-shape step eagerly, which is how the tests check it.) A graphed stepper is
    kept with its cache and graphs for the next batch of the same shape: capturing costs more than
    a batch's decoding, and the graphs replay into that very cache.
    """
    family = static_class(gpt)
    if family is None:
        return ForwardStepper(gpt)
    weight = gpt.get_input_embeddings().weight
    if cuda_graphs is None:
        cuda_graphs = weight.device.type == "cuda"
    if not cuda_graphs or GRAPHS_OFF_ATTR in gpt.__dict__:  # graphs that failed their check stay off
        return family(gpt, rows, positions)
    key = (_bucket(rows), positions, weight.dtype, weight.device)
    kept = gpt.__dict__.setdefault(GRAPHED_ATTR, {})  # owned by the model: it goes when the model goes
    if key not in kept:
        kept.clear()  # one shape at a time: each holds a cache as large as the batch's
        kept[key] = family(gpt, rows, positions, cuda_graphs=True)
    return kept[key]


# --------------------------------------------------------------------------- the generic path


@functools.cache
def forward_kwargs(forward_cls: type) -> tuple[str, bool]:
    """(name of the cache argument, whether ``logits_to_keep`` exists) for a causal LM class.

    transformers 5.x renamed ``past_key_values`` to ``cache``; older versions swallow an unknown
    ``cache=`` in ``**kwargs`` and silently recompute without it, so the name is read from the
    signature instead of guessed. A name this misses is caught by ``ForwardStepper``'s length check.
    """
    params = inspect.signature(forward_cls.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


class CacheIgnoredError(ClipCapError):
    """GPT-2's forward did not use the KV cache it was given (a renamed argument): captions would be wrong."""


class ForwardStepper:
    """Any causal LM through its own ``forward`` and transformers' ``DynamicCache``."""

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
