"""LoRA on the language model (``clipcap train --lora RANK``): between ``--only-prefix`` and the whole LM.

Training goes through peft: ``wrap`` injects low-rank adapters (A: rank x in, B: out x rank, B starting at
zero) into the LM's target modules in place, freezes the LM's own weights and leaves the mapper trainable.

A LoRA checkpoint holds the mapper and the adapters only (``lora.<module>.lora_A.weight`` / ``.lora_B.weight``)
with ``lora`` (rank, alpha, dropout, targets, fan_in_fan_out) in its metadata; the base LM comes from its name
or folder, as for ``--only-prefix`` checkpoints. Loading merges the adapters into the LM's weights with plain
tensor math (``merge_state``: W += (B @ A) * alpha / rank, transposed for GPT-2's Conv1D), so the loaded
model is a plain LM: decoding runs at its usual speed and does not need peft.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from clipcap_cli.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from clipcap_cli.model import ClipCaptionModel

METADATA_KEY = "lora"  # the checkpoint metadata entry (JSON of LoraSettings)
PREFIX = "lora."  # adapter tensors in a checkpoint: lora.<module path in the model>.lora_A.weight / .lora_B.weight
ADAPTER = "default"  # peft's adapter name
_ATTR = "_clipcap_lora"  # where wrap() leaves the settings on the model

# Default target modules by the LM's config.model_type. GPT-2's are transformers' Conv1D (weight stored
# in x out): peft's fan_in_fan_out. OPT names its attention output out_proj, the Llama-style families o_proj.
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
OPT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": GPT2_TARGETS,
    "opt": OPT_TARGETS,
    **{t: LLAMA_TARGETS for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2")},
}
MISSING_PEFT = "--lora needs peft, which is not installed: pip install 'clipcap-cli[lora]' (or pip install peft)"


@dataclass(frozen=True)
class LoraSettings:
    """The adapters' shape and scale, as a checkpoint records them."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    fan_in_fan_out: bool  # the target weights are stored in x out (GPT-2's Conv1D)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "targets": list(self.targets)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraSettings:
        data = json.loads(text)
        return cls(
            int(data["rank"]),
            float(data["alpha"]),
            float(data.get("dropout", 0.0)),
            tuple(data["targets"]),
            bool(data["fan_in_fan_out"]),
        )


def require_peft() -> Any:
    """The peft module, or a one-line UsageError saying how to install it."""
    try:
        import peft
    except ImportError as exc:
        raise UsageError(MISSING_PEFT) from exc
    return peft


def default_targets(lm: nn.Module) -> tuple[str, ...]:
    """The LM's default target modules: by its ``config.model_type``, else the first known family whose
    module names it has (a Llama-style model of a type not listed)."""
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    names = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    for family in (LLAMA_TARGETS, OPT_TARGETS, GPT2_TARGETS):
        if set(family) <= names:
            return family
    raise UsageError(f"no default LoRA targets for LM type {model_type!r}: name its modules with --lora-targets")


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of target names: the module's full name or its last parts."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_targets(lm: nn.Module, targets: tuple[str, ...]) -> bool:
    """Refuse targets that match nothing or a module the merge cannot take; return fan_in_fan_out."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    matched = [(name, m) for name, m in lm.named_modules() if name and _matches(name, targets)]
    if not matched:
        raise UsageError(f"--lora-targets {','.join(targets)} match no module of the LM")
    output = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    for name, module in matched:
        if not isinstance(module, (nn.Linear, Conv1D)) or module is output:
            raise UsageError(
                f"--lora-targets: {name} is a {type(module).__name__}; LoRA here adapts the LM's linear layers "
                "(not its embeddings or output head)"
            )
    kinds = {isinstance(m, Conv1D) for _, m in matched}
    if len(kinds) > 1:
        raise UsageError("--lora-targets mix Conv1D and Linear layers: choose modules of one kind")
    return kinds.pop()


def wrap(
    model: ClipCaptionModel,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: tuple[str, ...] | None = None,
) -> LoraSettings:
    """Inject LoRA adapters into ``model.gpt`` in place (peft); the LM's own weights are frozen.

    ``alpha`` None = ``rank`` (a scale of 1, as peft's defaults r=8, lora_alpha=8); ``targets`` None = the
    LM family's (``default_targets``). The mapper keeps training. The adapters' A matrices are drawn from
    torch's RNG (seed it first for a reproducible run), their B matrices start at zero, so the wrapped model
    starts out computing exactly what it did before.
    """
    peft = require_peft()
    if rank < 1:
        raise UsageError(f"--lora rank must be at least 1, got {rank}")
    targets = tuple(targets) if targets else default_targets(model.gpt)
    fan_in_fan_out = _check_targets(model.gpt, targets)
    settings = LoraSettings(rank, float(rank if alpha is None else alpha), float(dropout), targets, fan_in_fan_out)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(targets),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
    )
    peft.inject_adapter_in_model(config, model.gpt, adapter_name=ADAPTER)
    for name, param in model.gpt.named_parameters():
        param.requires_grad_(".lora_" in name)
    model.__dict__[_ATTR] = settings
    return settings


def settings_of(model: nn.Module) -> LoraSettings | None:
    """The LoRA settings of a model ``wrap`` adapted; None for any other model."""
    return model.__dict__.get(_ATTR)


def _lora_layers(model: ClipCaptionModel) -> list[tuple[str, Any]]:
    """(module path in ``model``, peft LoRA layer) for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_state(model: ClipCaptionModel) -> dict[str, torch.Tensor]:
    """The adapters as checkpoint tensors: ``lora.<module>.lora_A.weight`` (rank x in) and ``.lora_B.weight``
    (out x rank), keyed by the module's path in the plain (unwrapped) model."""
    out = {}
    for name, layer in _lora_layers(model):
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight.detach().contiguous().cpu()
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight.detach().contiguous().cpu()
    return out


def checkpoint_tensors(model: ClipCaptionModel) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint holds: the mapper and the adapters (the base LM is reloaded from its name)."""
    mapper = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k.startswith("clip_project.")}
    return {**mapper, **adapter_state(model)}


def checkpoint_metadata(model: ClipCaptionModel) -> dict[str, str]:
    settings = settings_of(model)
    return {METADATA_KEY: settings.to_json()} if settings else {}


def trainable_state(model: ClipCaptionModel) -> dict[str, torch.Tensor]:
    """The weights a resume needs: the mapper and the adapters, under the wrapped model's own names."""
    return {
        k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith("clip_project.") or ".lora_" in k
    }


def load_trainable_state(model: ClipCaptionModel, state: dict[str, torch.Tensor]) -> None:
    """Put ``trainable_state``'s tensors back; refused when they are not exactly this model's adapters."""
    expected = set(trainable_state(model))
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise UsageError(
            f"the resume state's adapters do not fit this model ({len(missing)} missing, {len(extra)} unexpected, "
            f"e.g. {(missing or extra)[0]}): resume with the run's own --lora options"
        )
    model.load_state_dict(state, strict=False)


def merge_checkpoint(raw: Any, lm: dict[str, torch.Tensor] | None) -> tuple[Any, dict[str, torch.Tensor] | None]:
    """``checkpoint.build_model``'s inputs with a LoRA file's adapters merged (``merge_state``): ``raw`` (a
    ``checkpoint.RawCheckpoint``) without its ``lora.*`` tensors, and the LM's tensors (``lm``: the pretrained
    LM's, for a file without them) merged. Anything else comes back as it is."""
    if METADATA_KEY not in raw.metadata:
        return raw, lm
    merged = merge_state({**raw.state, **(lm or {})}, raw.metadata)
    own = {k: merged[k] for k in raw.state if k in merged}  # the file's tensors (a full LM, if it holds one)
    return dataclasses.replace(raw, state=own), (None if lm is None else {k: merged[k] for k in lm})


def merge_state(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    """``state`` with a LoRA checkpoint's adapters merged into the LM weights, and the ``lora.*`` tensors gone.

    W += (B @ A) * alpha / rank, in fp32, then back to W's dtype; for GPT-2's Conv1D (stored in x out) the
    product is transposed. A state without LoRA metadata comes back as it is.
    """
    if METADATA_KEY not in metadata:
        return state
    settings = LoraSettings.from_json(metadata[METADATA_KEY])
    out = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    for key in state:
        if not (key.startswith(PREFIX) and key.endswith(".lora_A.weight")):
            continue
        module = key[len(PREFIX) : -len(".lora_A.weight")]
        a, b = state[key], state.get(f"{PREFIX}{module}.lora_B.weight")
        weight = out.get(f"{module}.weight")
        if b is None or weight is None:
            raise CheckpointError(f"LoRA adapter {module} has no {'lora_B' if b is None else 'base weight'} to merge")
        delta = (b.float() @ a.float()) * settings.scale  # (out, in)
        if settings.fan_in_fan_out:
            delta = delta.T
        if tuple(delta.shape) != tuple(weight.shape):
            raise CheckpointError(
                f"LoRA adapter {module} gives shape {tuple(delta.shape)}, its weight has {tuple(weight.shape)}"
            )
        out[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return out
