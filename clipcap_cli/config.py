"""The model configuration: everything needed to rebuild a ClipCap model from its weights.

Our checkpoints embed this as JSON, so ``clipcap caption --model run/epoch-010.safetensors``
needs no other flags. Released ClipCap files carry no config: ``checkpoint.py`` infers one
from the tensor shapes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from clipcap_cli.errors import UsageError

Mapping = Literal["mlp", "transformer"]
MAPPINGS: tuple[str, ...] = ("mlp", "transformer")

# The CLIP the released MLP models were trained on, and every default here: OpenAI's ViT-B/32.
DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"

# Which CLIP a checkpoint probably wants, from its input width (the released files: 512 -> ViT-B/32,
# 640 -> RN50x4): only a guess, for files that do not record their CLIP (the released ones) and for error
# messages. Widths themselves are read from open_clip's configs (clip_tower.clip_embed_dim).
CLIP_FOR_DIM: dict[int, str] = {512: "ViT-B-32", 640: "RN50x4", 768: "ViT-L-14", 1024: "RN50"}


# ``stop_token`` value meaning "stop at the tokenizer's end-of-text token only" (``--stop-token eos``).
EOS_STOP = "eos"


@dataclass(frozen=True)
class ModelConfig:
    """A ClipCap model. Defaults are the original train.py's (MLP, K=10, ViT-B/32, GPT-2 small)."""

    mapping: str = "mlp"  # "mlp" or "transformer"
    prefix_length: int = 10  # K: GPT-2 input embeddings made from one CLIP embedding
    clip_length: int = 10  # transformer mapper only: tokens the CLIP embedding is projected to
    num_layers: int = 8  # transformer mapper only
    prefix_size: int = 512  # CLIP embedding width (512 ViT-B/32, 640 RN50x4)
    normalize_prefix: bool = False  # L2-normalise the CLIP embedding before the mapper
    from_text: bool = False  # trained on CLIP text embeddings (CapDec): expects normalised image embeddings
    only_prefix: bool = False  # GPT-2 frozen (trained mapper only)
    clip_model: str = DEFAULT_CLIP_MODEL  # open_clip name, or "local-dir:PATH"
    clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED  # open_clip pretrained tag (None for local-dir models)
    lm: str = "gpt2"  # Hugging Face name or local folder of the causal language model and its tokenizer
    stop_token: str = "."  # decoding stops after this token (the original's); EOS_STOP: the tokenizer's end of text

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise UsageError(f"unknown mapping {self.mapping!r}: choose one of {', '.join(MAPPINGS)}")
        for name in ("prefix_length", "clip_length", "num_layers", "prefix_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be a positive integer, got {getattr(self, name)}")

    @property
    def gpt2(self) -> str:
        """The language model's name: the field's name before any causal LM could be chosen."""
        return self.lm

    def replace(self, **changes: Any) -> ModelConfig:
        changes = _renamed(changes)
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys come from newer versions: ignore them rather than refuse the file.
        return cls(**{k: v for k, v in _renamed(data).items() if k in known})


def _renamed(data: dict[str, Any]) -> dict[str, Any]:
    """Older names of fields (``gpt2``, before any causal LM) under their current ones."""
    if "gpt2" not in data:
        return data
    data = dict(data)
    old = data.pop("gpt2")
    if data.get("lm") is None:
        data["lm"] = old
    return data


def _accept_old_names(init: Any) -> Any:
    """``ModelConfig(gpt2=...)`` and ``dataclasses.replace(config, gpt2=...)`` keep working: ``gpt2``
    was the LM field's name before any causal LM could be chosen (the CLI keeps ``--gpt2`` too)."""

    def __init__(self: ModelConfig, *args: Any, gpt2: str | None = None, **kwargs: Any) -> None:
        if gpt2 is not None:
            kwargs["lm"] = gpt2
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    return __init__


ModelConfig.__init__ = _accept_old_names(ModelConfig.__init__)  # type: ignore[method-assign]
