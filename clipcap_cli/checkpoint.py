"""Reading and writing ClipCap weights: the only module that touches weight files.

Two formats:

* the original release (``coco_weights.pt``, ``conceptual_weights.pt``, the transformer file): a bare
  ``torch.save(state_dict)`` with no config. Loaded with ``weights_only=True``; the GPT-2 attention
  buffers that old transformers saved are dropped; the model is inferred from the tensor shapes.
* ours: safetensors with the ``ModelConfig`` in the metadata. Frozen-LM (only-prefix) checkpoints
  hold only the mapper plus the LM's name and config, not 500 MB of unchanged GPT-2.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipcap_cli import backbones
from clipcap_cli.config import CLIP_FOR_DIM, DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, ModelConfig
from clipcap_cli.errors import CheckpointError
from clipcap_cli.fsutil import atomic_write
from clipcap_cli.model import ClipCaptionModel
from clipcap_cli.version import __version__

FORMAT = "clipcap"
FORMAT_VERSION = "1"
# Causal-mask buffers that transformers <= 4.11 saved in every GPT-2 state dict; newer versions
# make them non-persistent, so a strict load of the released files fails on them (original issue #76).
STALE_GPT_BUFFER = re.compile(r"^gpt\.transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
GPT_LAYER = re.compile(r"^gpt\.transformer\.h\.(\d+)\.")
MAPPER_LAYER = re.compile(r"^clip_project\.transformer\.layers\.(\d+)\.")
TIED_LM_HEAD = "gpt.lm_head.weight"


@dataclass
class RawCheckpoint:
    """What a weight file holds, before a model is built from it."""

    state: dict[str, torch.Tensor]
    config: ModelConfig | None = None  # embedded config (our files); None for released files
    gpt2_config: dict[str, Any] | None = None  # GPT-2 architecture, when the file carries it
    metadata: dict[str, str] = field(default_factory=dict)


def read(path: str | Path) -> RawCheckpoint:
    """Read a checkpoint file without building anything. Never unpickles code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an unsafe pickle, a truncated file, not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {path.name} as a weights-only torch checkpoint: {first}") from exc
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in ("state_dict", "model_state_dict", "model"):  # common training-script wrappers
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        raise CheckpointError(f"{path.name} is not a ClipCap state dict (no tensors keyed by name)")
    state = {k: v for k, v in obj.items() if not STALE_GPT_BUFFER.match(k)}
    return RawCheckpoint(state=state)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _read_safetensors(path: Path) -> RawCheckpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc}") from exc
    config = ModelConfig.from_dict(json.loads(metadata["config"])) if "config" in metadata else None
    gpt2_config = json.loads(metadata["gpt2_config"]) if "gpt2_config" in metadata else None
    return RawCheckpoint(state=state, config=config, gpt2_config=gpt2_config, metadata=metadata)


def infer_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """A ModelConfig from tensor shapes alone (released files carry no config)."""
    if "clip_project.model.0.weight" in state and "clip_project.model.2.weight" in state:
        prefix_size = state["clip_project.model.0.weight"].shape[1]
        out = state["clip_project.model.2.weight"].shape[0]
        embed = _embedding_size(state, default=out // 10)
        if out % embed:
            raise CheckpointError(f"MLP mapper output {out} is not a multiple of the LM width {embed}")
        mapping, prefix_length, clip_length, num_layers = "mlp", out // embed, 10, 8
    elif "clip_project.prefix_const" in state and "clip_project.linear.weight" in state:
        prefix_length, embed = state["clip_project.prefix_const"].shape
        out, prefix_size = state["clip_project.linear.weight"].shape
        layers = {int(m.group(1)) for k in state if (m := MAPPER_LAYER.match(k))}
        mapping, clip_length, num_layers = "transformer", out // embed, max(layers) + 1 if layers else 0
    elif "clip_project.weight" in state:
        raise CheckpointError(
            "this checkpoint uses a single-Linear mapper (the original predict.py's prefix_length > 10 variant), "
            "which clipcap does not support"
        )
    else:
        raise CheckpointError("no ClipCap mapper found (expected clip_project.model.* or clip_project.transformer.*)")
    clip = CLIP_FOR_DIM.get(prefix_size)
    return ModelConfig(
        mapping=mapping,
        prefix_length=prefix_length,
        clip_length=clip_length,
        num_layers=max(num_layers, 1),
        prefix_size=prefix_size,
        # The only released transformer checkpoint was used with L2-normalised CLIP embeddings
        # (the original's transformer notebook); the MLP ones were not.
        normalize_prefix=mapping == "transformer",
        clip_model=clip or DEFAULT_CLIP_MODEL,
        clip_pretrained=DEFAULT_CLIP_PRETRAINED,
    )


def _embedding_size(state: dict[str, torch.Tensor], default: int) -> int:
    wte = state.get("gpt.transformer.wte.weight")
    return int(wte.shape[1]) if wte is not None else default


def infer_gpt2_config(state: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """GPT-2's architecture from the ``gpt.*`` tensors, or None when the file has no LM weights."""
    wte = state.get("gpt.transformer.wte.weight")
    wpe = state.get("gpt.transformer.wpe.weight")
    if wte is None or wpe is None:
        return None
    layers = {int(m.group(1)) for k in state if (m := GPT_LAYER.match(k))}
    n_embd = int(wte.shape[1])
    # Every GPT-2 size (small, medium, large, xl) uses 64-wide heads.
    return {
        "vocab_size": int(wte.shape[0]),
        "n_positions": int(wpe.shape[0]),
        "n_embd": n_embd,
        "n_layer": max(layers) + 1,
        "n_head": max(n_embd // 64, 1),
    }


def describe_clip_mismatch(expected: int, clip_model: str, got: int | None) -> str:
    want = CLIP_FOR_DIM.get(expected)
    want_txt = f" ({want})" if want else ""
    return (
        f"this checkpoint expects {expected}-d CLIP features{want_txt}; "
        f"you gave {clip_model} ({got}-d)" + (f": use --clip {want}" if want else "")
    )


def resolve_config(raw: RawCheckpoint, **overrides: Any) -> ModelConfig:
    """The embedded or inferred config, with the caller's settings (None = keep) applied."""
    config = raw.config or infer_config(raw.state)
    config = config.replace(**overrides)
    got = backbones.clip_embed_dim(config.clip_model)
    if got is not None and got != config.prefix_size:
        raise CheckpointError(describe_clip_mismatch(config.prefix_size, config.clip_model, got))
    return config


def build_model(raw: RawCheckpoint, config: ModelConfig) -> ClipCaptionModel:
    """A ClipCaptionModel holding the checkpoint's weights (strict: nothing missing, nothing extra)."""
    from transformers import GPT2Config

    has_gpt = any(k.startswith("gpt.") for k in raw.state)
    if has_gpt:
        gpt_arch = raw.gpt2_config or infer_gpt2_config(raw.state)
        if gpt_arch is None:
            raise CheckpointError("checkpoint has partial GPT-2 weights (no wte/wpe)")
        gpt = backbones.build_gpt2(GPT2Config(**_gpt2_kwargs(gpt_arch)))
    else:
        gpt = backbones.load_gpt2(config.gpt2)  # frozen-LM checkpoint: the pretrained LM it was trained on
    model = ClipCaptionModel(config, gpt)
    state = dict(raw.state)
    if has_gpt and TIED_LM_HEAD not in state and gpt.config.tie_word_embeddings:
        state[TIED_LM_HEAD] = state["gpt.transformer.wte.weight"]
    expected = model.state_dict() if has_gpt else model.clip_project.state_dict()
    if not has_gpt:
        state = {k[len("clip_project.") :]: v for k, v in state.items()}
    _check_keys(expected, state)
    target = model if has_gpt else model.clip_project
    target.load_state_dict(state, strict=True)
    return model


def check_structure(raw: RawCheckpoint, config: ModelConfig) -> None:
    """Strictly compare the file's keys and shapes with the model ``config`` describes, without
    allocating it (the model is built on the meta device). Raises CheckpointError."""
    from transformers import GPT2Config

    gpt_arch = raw.gpt2_config or infer_gpt2_config(raw.state)
    if gpt_arch is None:
        raise CheckpointError("checkpoint has no GPT-2 weights to check against")
    with torch.device("meta"):
        model = ClipCaptionModel(config, backbones.build_gpt2(GPT2Config(**_gpt2_kwargs(gpt_arch))))
    state = dict(raw.state)
    if TIED_LM_HEAD not in state and "gpt.transformer.wte.weight" in state:
        state[TIED_LM_HEAD] = state["gpt.transformer.wte.weight"]
    _check_keys(model.state_dict(), state)


def _gpt2_kwargs(arch: dict[str, Any]) -> dict[str, Any]:
    keep = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
            "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id", "eos_token_id", "scale_attn_weights")
    return {k: arch[k] for k in keep if k in arch}


def _check_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(parts) + " keys")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"checkpoint tensor {key} has shape {tuple(state[key].shape)}, the model needs {tuple(tensor.shape)}"
            )


def load(path: str | Path, device: torch.device | str = "cpu", **overrides: Any) -> ClipCaptionModel:
    """Load any supported checkpoint as an eval-mode model on ``device``.

    ``overrides`` are ModelConfig fields (clip_model=, normalize_prefix=, gpt2=, ...); None keeps
    what the checkpoint says or implies.
    """
    raw = read(path)
    config = resolve_config(raw, **overrides)
    return build_model(raw, config).to(device).eval()


def save(model: ClipCaptionModel, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` as safetensors with its config embedded, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = model.state_dict()
    gpt = model.gpt
    if config.only_prefix:
        state = {k: v for k, v in state.items() if k.startswith("clip_project.")}
    elif gpt.config.tie_word_embeddings:
        state.pop(TIED_LM_HEAD, None)  # shared with wte; safetensors refuses aliased tensors
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clipcap_version": __version__,
        "config": config.to_json(),
        "gpt2_config": json.dumps({k: getattr(gpt.config, k) for k in _gpt2_attr_names(gpt.config)}),
    }
    metadata.update(extra_metadata or {})
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path


def _gpt2_attr_names(cfg: Any) -> list[str]:
    names = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
             "layer_norm_epsilon", "tie_word_embeddings", "bos_token_id", "eos_token_id")
    return [n for n in names if hasattr(cfg, n)]
