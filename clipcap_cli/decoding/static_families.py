"""The LM families the static cache (``static_lm.StaticStepper``) steps: GPT-2, Llama-style and OPT.

Each family is transformers' own math restated over the model's own modules (its Linear, norm and
activation modules, SDPA with its scale), so that in fp32 the logits equal the model's ``forward``.
Exactness needs the stock classes: ``static_class`` returns a family only for transformers' own
classes with nothing overridden, and ``None`` (the generic ``ForwardStepper``) for anything else.

- GPT-2: learned positions, pre-LayerNorm blocks, fused QKV (``Conv1D``), tanh GELU.
- Llama-style (``LlamaForCausalLM``, ``Qwen2ForCausalLM``; SmolLM2 is Llama): RMSNorm, rotary
  positions from the model's own rotary module (``rope_theta`` and the static ``rope_scaling``
  types; the prefix occupies positions 0..K-1 as in HF's forward with ``inputs_embeds``),
  grouped-query attention, SiLU-gated MLP, Qwen2's q/k/v biases. Dynamic-NTK and LongRoPE
  (whose frequencies depend on the sequence length) and Qwen2's sliding-window layers take the
  generic path.
- OPT: learned positions with OPT's offset of 2, pre- or post-LayerNorm (``do_layer_norm_before``),
  ReLU, ``project_in``/``project_out`` when ``word_embed_proj_dim`` differs from ``hidden_size``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipcap_cli.decoding.static_lm import Attend, StaticStepper

if TYPE_CHECKING:
    import torch

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")  # frequencies fixed at load time


def static_class(lm: Any) -> type[StaticStepper] | None:
    """The static stepper that computes exactly what ``lm``'s forward does, or None (the generic path)."""
    if is_stock_gpt2(lm):
        return StaticGPT2
    if is_stock_llama(lm):
        return StaticLlama
    if is_stock_opt(lm):
        return StaticOPT
    return None


def _unchanged(obj: Any, cls: type) -> bool:
    """``obj`` is exactly ``cls``'s instance, or a subclass's that keeps ``cls.forward``."""
    return isinstance(obj, cls) and type(obj).forward is cls.forward


# --------------------------------------------------------------------------- GPT-2


def is_stock_gpt2(gpt: Any) -> bool:
    """Whether ``gpt`` computes exactly what transformers' GPT-2 does, so our own step may replace its forward.

    A subclass that overrides ``forward`` (or a block), or cross-attention, takes the generic path:
    our step would silently skip what the override does.
    """
    try:
        from transformers.models.gpt2 import modeling_gpt2 as hf
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if not _unchanged(gpt, hf.GPT2LMHeadModel):
        return False
    if type(gpt.transformer) is not hf.GPT2Model or getattr(gpt.config, "add_cross_attention", False):
        return False
    return all(
        type(b) is hf.GPT2Block and type(b.attn) is hf.GPT2Attention and type(b.mlp) is hf.GPT2MLP
        for b in gpt.transformer.h
    )


class StaticGPT2(StaticStepper):
    """GPT-2 (transformers' ``GPT2LMHeadModel``). In bf16/fp16 the tanh GELU is PyTorch's fused one."""

    def __init__(self, gpt: Any, rows: int, positions: int, cuda_graphs: bool = False):
        self.gpt = gpt
        self.blocks = list(gpt.transformer.h)
        config = gpt.config
        self.layers, self.n_head = len(self.blocks), config.n_head
        self.kv_heads, self.head_dim, self.width = config.n_head, config.n_embd // config.n_head, config.n_embd
        self.scales = [_gpt2_attention_scale(b.attn, config, i) for i, b in enumerate(self.blocks)]
        self.head = gpt.lm_head
        super().__init__(gpt, rows, positions, cuda_graphs)
        self.fused_gelu = self.half and getattr(config, "activation_function", "") in TANH_GELUS

    def _norm_modules(self) -> list[Any]:
        return [m for b in self.blocks for m in (b.ln_1, b.ln_2)] + [self.gpt.transformer.ln_f]

    def _embed(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        wpe = self.gpt.transformer.wpe.weight[start : start + embeds.shape[1]]
        return embeds.to(self.stream) + wpe.to(self.stream)

    def _block(self, i: int, x: torch.Tensor, rope: Any, attend: Attend) -> torch.Tensor:
        import torch.nn.functional as F

        block = self.blocks[i]
        q, k, v = (
            self._heads(z, self.n_head) for z in block.attn.c_attn(self._norm(block.ln_1, x)).split(self.width, dim=-1)
        )  # 3 x (N, H, T, D)
        x = x + block.attn.c_proj(attend(i, q, k, v)).to(self.stream)
        mlp = block.mlp
        h = mlp.c_fc(self._norm(block.ln_2, x))
        # bf16/fp16: PyTorch's fused tanh GELU is the same formula as GPT-2's gelu_new in one
        # kernel (2x faster in bf16 on the CPU); fp32 keeps transformers' own module.
        h = F.gelu(h, approximate="tanh") if self.fused_gelu else mlp.act(h)
        return x + mlp.c_proj(h).to(self.stream)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(self.gpt.transformer.ln_f, x, self.stream)


def _gpt2_attention_scale(attn: Any, config: Any, layer: int) -> float:
    """GPT-2's attention scale: 1/sqrt(head_dim) (scale_attn_weights), divided by layer+1 if configured."""
    if hasattr(attn, "scaling"):  # transformers 5 precomputes it
        return float(attn.scaling)
    scale = (config.n_embd // config.n_head) ** -0.5 if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(layer + 1)
    return scale


# --------------------------------------------------------------------------- Llama-style


def _llama_modules() -> list[tuple[Any, ...]]:
    """(CausalLM, Model, DecoderLayer, Attention, MLP, RMSNorm, RotaryEmbedding) of each Llama-style family."""
    found = []
    for name, prefix in (("llama", "Llama"), ("qwen2", "Qwen2")):
        try:
            module = __import__(f"transformers.models.{name}.modeling_{name}", fromlist=["_"])
        except ImportError:  # pragma: no cover - both ship with transformers
            continue
        found.append(
            tuple(
                getattr(module, prefix + part)
                for part in ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")
            )
        )
    return found


def is_stock_llama(lm: Any) -> bool:
    """Whether ``lm`` is transformers' own Llama or Qwen2 causal LM, nothing overridden, every layer full
    attention, and rotary frequencies that do not depend on the sequence length."""
    for causal, model, layer, attention, mlp, norm, rotary in _llama_modules():
        if not _unchanged(lm, causal):
            continue
        inner = lm.model
        if type(inner) is not model or type(inner.norm) is not norm or type(inner.rotary_emb) is not rotary:
            return False
        if getattr(inner.rotary_emb, "rope_type", "default") not in STATIC_ROPE_TYPES:
            return False
        if any(t != "full_attention" for t in getattr(lm.config, "layer_types", None) or ()):
            return False  # Qwen2's sliding-window layers
        return all(
            type(b) is layer
            and type(b.self_attn) is attention
            and type(b.mlp) is mlp
            and type(b.input_layernorm) is norm
            and type(b.post_attention_layernorm) is norm
            for b in inner.layers
        )
    return False


class StaticLlama(StaticStepper):
    """Llama-style decoders: RMSNorm, rotary positions, grouped-query attention, SiLU-gated MLP."""

    def __init__(self, lm: Any, rows: int, positions: int, cuda_graphs: bool = False):
        config = lm.config
        self.blocks = list(lm.model.layers)[: config.num_hidden_layers]
        attn = self.blocks[0].self_attn
        self.layers, self.n_head = len(self.blocks), config.num_attention_heads
        self.kv_heads, self.head_dim, self.width = config.num_key_value_heads, attn.head_dim, config.hidden_size
        self.scales = [float(b.self_attn.scaling) for b in self.blocks]
        self.head = lm.lm_head
        super().__init__(lm, rows, positions, cuda_graphs)

    def _setup_rope(self) -> None:
        """cos/sin of every absolute position 0..positions-1, from the model's own rotary module (in the
        model's dtype as its forward has them; fp32 under bf16/fp16, where the rotation runs in fp32)."""
        import torch

        x = torch.zeros(1, dtype=self.stream, device=self.device)
        positions = torch.arange(self.positions, device=self.device)[None]
        cos, sin = self.lm.model.rotary_emb(x, position_ids=positions)  # (1, P, D) each
        self.rope = (cos[0], sin[0])

    def _norm_modules(self) -> list[Any]:
        return [m for b in self.blocks for m in (b.input_layernorm, b.post_attention_layernorm)] + [self.lm.model.norm]

    def _embed(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        return embeds.to(self.stream)

    def _block(self, i: int, x: torch.Tensor, rope: Any, attend: Attend) -> torch.Tensor:
        block = self.blocks[i]
        attn, mlp = block.self_attn, block.mlp
        h = self._norm(block.input_layernorm, x)
        q = self._heads(attn.q_proj(h), self.n_head)
        k = self._heads(attn.k_proj(h), self.kv_heads)
        v = self._heads(attn.v_proj(h), self.kv_heads)
        q, k = self._rotate(q, rope), self._rotate(k, rope)
        x = x + attn.o_proj(attend(i, q, k, v)).to(self.stream)
        h = self._norm(block.post_attention_layernorm, x)
        return x + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)).to(self.stream)

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(self.lm.model.norm, x, self.stream)


# --------------------------------------------------------------------------- OPT


def is_stock_opt(lm: Any) -> bool:
    """Whether ``lm`` is transformers' own ``OPTForCausalLM``, nothing overridden."""
    try:
        from transformers.models.opt import modeling_opt as hf
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if not _unchanged(lm, hf.OPTForCausalLM):
        return False
    if type(lm.model) is not hf.OPTModel or type(lm.model.decoder) is not hf.OPTDecoder:
        return False
    decoder = lm.model.decoder
    if type(decoder.embed_positions) is not hf.OPTLearnedPositionalEmbedding:
        return False
    return all(type(b) is hf.OPTDecoderLayer and type(b.self_attn) is hf.OPTAttention for b in decoder.layers)


class StaticOPT(StaticStepper):
    """OPT: learned positions (offset 2), pre- or post-LayerNorm, ReLU, optional project_in/project_out."""

    def __init__(self, lm: Any, rows: int, positions: int, cuda_graphs: bool = False):
        config = lm.config
        self.decoder = lm.model.decoder
        self.blocks = list(self.decoder.layers)
        self.pre_norm = bool(config.do_layer_norm_before)
        self.layers, self.n_head = len(self.blocks), config.num_attention_heads
        self.kv_heads, self.width = config.num_attention_heads, config.hidden_size
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scales = [1.0] * self.layers  # OPT scales the queries before attention
        self.head = lm.lm_head
        super().__init__(lm, rows, positions, cuda_graphs)

    def _norm_modules(self) -> list[Any]:
        norms = [m for b in self.blocks for m in (b.self_attn_layer_norm, b.final_layer_norm)]
        return norms + ([self.decoder.final_layer_norm] if self.decoder.final_layer_norm is not None else [])

    def _embed(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        d = self.decoder
        if d.project_in is not None:
            embeds = d.project_in(embeds.to(self.dtype))
        offset = d.embed_positions.offset
        positions = d.embed_positions.weight[start + offset : start + offset + embeds.shape[1]]
        return embeds.to(self.stream) + positions.to(self.stream)

    def _block(self, i: int, x: torch.Tensor, rope: Any, attend: Attend) -> torch.Tensor:
        block = self.blocks[i]
        attn = block.self_attn
        h = self._norm(block.self_attn_layer_norm, x) if self.pre_norm else self._in(x)
        q = self._heads(attn.q_proj(h) * attn.scaling, self.n_head)
        k, v = self._heads(attn.k_proj(h), self.n_head), self._heads(attn.v_proj(h), self.n_head)
        x = x + attn.out_proj(attend(i, q, k, v)).to(self.stream)
        if not self.pre_norm:
            x = self._norm(block.self_attn_layer_norm, x, self.stream)
        h = self._norm(block.final_layer_norm, x) if self.pre_norm else self._in(x)
        x = x + block.fc2(block.activation_fn(block.fc1(h))).to(self.stream)
        if not self.pre_norm:
            x = self._norm(block.final_layer_norm, x, self.stream)
        return x

    def _final(self, x: torch.Tensor) -> torch.Tensor:
        d = self.decoder
        if d.final_layer_norm is not None:
            x = self._norm(d.final_layer_norm, x, self.stream)
        if d.project_out is not None:
            x = d.project_out(self._in(x)).to(self.stream)
        return x
