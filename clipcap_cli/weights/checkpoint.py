"""Reading and writing ClipCap weights: the only module that touches weight files.

Two formats:

* the original release (``coco_weights.pt``, ``conceptual_weights.pt``, the transformer file): a bare
  ``torch.save(state_dict)`` with no config. Read with ``weights_only=True`` (memory-mapped); the
  GPT-2 attention buffers that old transformers saved are dropped; the model is inferred from the
  tensor shapes. A downloaded one is converted once into safetensors beside it (``to_safetensors``).
* ours: safetensors with the ``ModelConfig`` in the metadata. Frozen-LM (only-prefix) checkpoints
  hold only the mapper plus the LM's name and config, not 500 MB of unchanged GPT-2.

Models are built on the meta device and the file's tensors assigned to them: nothing is
initialised at random only to be overwritten, and no tensor is held twice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipcap_cli.config import CLIP_FOR_DIM, DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, ModelConfig
from clipcap_cli.errors import CheckpointError
from clipcap_cli.fsutil import atomic_write
from clipcap_cli.model import ClipCaptionModel
from clipcap_cli.version import __version__
from clipcap_cli.weights import lm

FORMAT = "clipcap"
FORMAT_VERSION = "1"
CONVERTED_FORMAT = "clipcap-converted"  # a released .pt, converted as it is (no config)
# The GPT-2 architecture fields a checkpoint records and a model is built from (GPT2Config names).
GPT2_ARCH_KEYS = (
    "vocab_size",
    "n_positions",
    "n_embd",
    "n_layer",
    "n_head",
    "n_inner",
    "activation_function",
    "layer_norm_epsilon",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "scale_attn_weights",
)
# What the tensors fix (n_head and the rest cannot be seen in them).
GPT2_SHAPE_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_inner")
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
    lm_config: dict[str, Any] | None = None  # another family's full config (lm.record), when the LM is not GPT-2
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def has_lm(self) -> bool:
        """Whether the file holds GPT-2's weights (frozen-LM files of ours hold only the mapper)."""
        return any(k.startswith("gpt.") for k in self.state)


def read(path: str | Path) -> RawCheckpoint:
    """Read a checkpoint file without building anything. Never unpickles code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path)
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in ("state_dict", "model_state_dict", "model"):  # common training-script wrappers
            if _is_state_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _is_state_dict(obj):
        raise CheckpointError(f"{path.name} is not a ClipCap state dict (no tensors keyed by name)")
    state = {k: v for k, v in obj.items() if not STALE_GPT_BUFFER.match(k)}
    return RawCheckpoint(state=state)


def holds_lm(path: str | Path) -> bool:
    """Whether a checkpoint file holds GPT-2's weights, reading only its header when it can."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith("gpt.") for k in f.keys())
    return read(path).has_lm


def _torch_load(path: Path) -> Any:
    """``torch.load`` with weights only, memory-mapped when the file allows it (zip format)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files
    except Exception as exc:  # an unsafe pickle, a truncated file, not a torch file at all
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {path.name} as a weights-only torch checkpoint: {first}") from exc


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
    lm_config = json.loads(metadata["lm_config"]) if "lm_config" in metadata else None
    return RawCheckpoint(state=state, config=config, gpt2_config=gpt2_config, lm_config=lm_config, metadata=metadata)


def to_safetensors(path: str | Path) -> Path:
    """Convert a released ``.pt`` into ``<name>.safetensors`` beside it, once, and return that file.

    Every tensor of the new file is compared with the original before it is used; the tied
    ``lm_head`` (the same storage as ``wte``) and the stale attention buffers are left out. A
    conversion made from another version of the ``.pt`` (size or time changed) is redone.
    """
    from safetensors.torch import safe_open, save_file

    path = Path(path)
    target = path.with_suffix(".safetensors")
    stamp = f"{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if target.is_file():
        try:
            with safe_open(str(target), framework="pt") as f:
                if (f.metadata() or {}).get("source_stamp") == stamp:
                    return target
        except Exception:  # a damaged conversion is simply redone
            pass
    state = read(path).state
    wte, head = state.get("gpt.transformer.wte.weight"), state.get(TIED_LM_HEAD)
    if head is not None and wte is not None and (head.data_ptr() == wte.data_ptr() or torch.equal(head, wte)):
        state = {k: v for k, v in state.items() if k != TIED_LM_HEAD}
    state = {k: v.contiguous() for k, v in state.items()}
    metadata = {"format": CONVERTED_FORMAT, "source": path.name, "source_stamp": stamp}
    atomic_write(target, lambda tmp: save_file(state, tmp, metadata=metadata))
    with safe_open(str(target), framework="pt") as f:
        if set(f.keys()) != set(state) or not all(torch.equal(f.get_tensor(k), state[k]) for k in state):
            target.unlink(missing_ok=True)
            raise CheckpointError(f"converting {path.name} to safetensors gave different tensors; kept the .pt")
    return target


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
        "n_inner": int(state["gpt.transformer.h.0.mlp.c_fc.weight"].shape[1]),
    }


def gpt2_architecture(
    raw: RawCheckpoint,
    named: dict[str, Any] | None = None,
    source: str = "--gpt2",
    lm: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The GPT-2 architecture to build for ``raw``: the named model's config (``--gpt2 DIR`` or the
    registry's), else the one the file records, else what the tensors show (a bare released file:
    64-wide heads, as every GPT-2 size has).

    Raises CheckpointError when a config and the tensors disagree: the heads' width cannot be seen
    in the tensors, so a wrong config would silently give other captions. ``lm``: the pretrained
    GPT-2's tensors for a frozen-LM file (``lm_state``).
    """
    seen = infer_gpt2_config({**raw.state, **(lm or {})})
    chosen = None
    for arch, where in ((named, source), (raw.gpt2_config, "the checkpoint's metadata")):
        if arch is None:
            continue
        arch = {k: arch[k] for k in GPT2_ARCH_KEYS if arch.get(k) is not None}
        if seen is not None:
            _check_arch(arch, seen, where)
        if chosen is None:
            chosen = arch
        elif chosen.get("n_head") != arch.get("n_head"):
            raise CheckpointError(
                f"GPT-2 configs disagree: {source} has {chosen.get('n_head')} heads, the checkpoint's metadata "
                f"{arch.get('n_head')}; pass --gpt2 with the model this checkpoint was trained on"
            )
    if chosen is None and seen is None:
        raise CheckpointError("this checkpoint holds no GPT-2 weights and no GPT-2 config was found: pass --gpt2 DIR")
    return chosen or seen  # type: ignore[return-value]


def _check_arch(arch: dict[str, Any], seen: dict[str, Any], where: str) -> None:
    def shapes(a: dict[str, Any]) -> dict[str, Any]:
        return {**{k: a.get(k) for k in GPT2_SHAPE_KEYS}, "n_inner": a.get("n_inner") or 4 * a["n_embd"]}

    want, got = shapes(arch), shapes(seen)
    wrong = [f"{k} {want[k]} in the config, {got[k]} in the tensors" for k in GPT2_SHAPE_KEYS if want[k] != got[k]]
    if arch["n_embd"] % arch.get("n_head", 1):
        wrong.append(f"n_embd {arch['n_embd']} is not a multiple of n_head {arch['n_head']}")
    if wrong:
        raise CheckpointError(
            f"the GPT-2 config from {where} does not fit this checkpoint's GPT-2 tensors ({'; '.join(wrong)}): "
            "pass --gpt2 with the model this checkpoint was trained on"
        )


def describe_clip_mismatch(expected: int, clip_model: str, got: int | None, trained_on: str | None = None) -> str:
    """One line naming both sides: the tower the mapper was trained on (what the checkpoint records;
    for a released file, the usual CLIP of that width) and the one given."""
    want = trained_on or CLIP_FOR_DIM.get(expected)
    want_txt = f" ({'trained on ' if trained_on else ''}{want})" if want else ""
    return f"this checkpoint expects {expected}-d CLIP features{want_txt}; you gave {clip_model} ({got}-d)" + (
        f": use --clip {want}" if want else ""
    )


def resolve_config(raw: RawCheckpoint, **overrides: Any) -> ModelConfig:
    """The embedded or inferred config, with the caller's settings (None = keep) applied."""
    return (raw.config or infer_config(raw.state)).replace(**overrides)


def check_clip(config: ModelConfig, clip_dim: int | None, trained_on: str | None = None) -> None:
    """Refuse a CLIP whose embedding width (``clip_dim``; None = unknown) the mapper cannot take.
    ``trained_on``: the tower the checkpoint records, named in the error."""
    if clip_dim is not None and clip_dim != config.prefix_size:
        raise CheckpointError(describe_clip_mismatch(config.prefix_size, config.clip_model, clip_dim, trained_on))


def lm_state(weights: dict[str, torch.Tensor], base_prefix: str = "transformer") -> dict[str, torch.Tensor]:
    """A pretrained LM's tensors (hub or ``save_pretrained`` layout) as ``gpt.*`` checkpoint keys.
    ``base_prefix``: where the family's causal-LM class keeps its base model (GPT-2: "transformer")."""
    state = lm.state_keys(weights, base_prefix)
    return {k: v for k, v in state.items() if not STALE_GPT_BUFFER.match(k)}


def lm_architecture(
    raw: RawCheckpoint,
    named: Any | None = None,
    name: str = "--lm",
    lm_tensors: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The LM to build for ``raw``, as a config dict (GPT-2: ``gpt2_architecture``'s fields; another
    family: its recorded config, with ``model_type``).

    ``named``: the config of the LM the user or the checkpoint's config names (a transformers config,
    or None when there is none to be had). Raises CheckpointError, naming both sides, when it is
    another LM than the one the checkpoint was trained on.
    """
    recorded = raw.lm_config
    if recorded is not None:
        built = lm.config_from_dict(recorded)
        if named is not None:
            _check_same_lm(built, named, name)
        return {**lm.record(built), "model_type": lm.model_type(built)}
    if named is not None and not lm.is_gpt2(named):
        theirs = gpt2_architecture(raw, lm=lm_tensors) if raw.has_lm or lm_tensors else None
        ours = f"GPT-2 (hidden {theirs['n_embd']}, vocab {theirs['vocab_size']})" if theirs else "GPT-2"
        raise CheckpointError(
            f"this checkpoint was trained on {ours}; --lm {lm.describe(name, named)} is another language model: "
            "drop --lm, or give the GPT-2 it was trained on"
        )
    return gpt2_architecture(raw, named.to_dict() if named is not None else None, f"GPT-2 '{name}'", lm=lm_tensors)


def _check_same_lm(recorded: Any, named: Any, name: str) -> None:
    keys = ("vocab_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    same = lm.model_type(recorded) == lm.model_type(named) and lm.hidden_size(recorded) == lm.hidden_size(named)
    same = same and all(getattr(recorded, k, None) == getattr(named, k, None) for k in keys)
    if not same:
        raise CheckpointError(
            f"this checkpoint was trained on the LM {lm.describe('recorded', recorded)}; "
            f"--lm {lm.describe(name, named)} is another: drop --lm, or give the LM it was trained on"
        )


def build_model(
    raw: RawCheckpoint,
    config: ModelConfig,
    gpt2_arch: dict[str, Any] | None = None,
    lm: dict[str, torch.Tensor] | None = None,
) -> ClipCaptionModel:
    """A ClipCaptionModel holding the checkpoint's weights (strict: nothing missing, nothing extra).

    The model is built on the meta device and the tensors are assigned, not copied. ``gpt2_arch``
    is the GPT-2 to build (default: ``gpt2_architecture(raw)``); ``lm`` gives GPT-2's weights for a
    frozen-LM file that holds only its mapper (``lm_state`` of the pretrained model's tensors).
    """
    from clipcap_cli.weights import lora

    raw, lm = lora.merge_checkpoint(raw, lm)  # a LoRA file: its adapters merged into the LM's weights
    state = dict(raw.state)
    if not raw.has_lm:
        if lm is None:
            raise CheckpointError("this checkpoint holds only its mapper: the pretrained LM's weights are needed")
        state.update(lm)
    model = _meta_model(config, gpt2_arch or lm_architecture(raw, lm_tensors=lm))
    tied = _tie_state(model, state)
    _check_keys(model.state_dict(), state)
    model.load_state_dict(state, strict=True, assign=True)
    if tied:
        model.gpt.tie_weights()  # assignment gave lm_head its own Parameter: share the embeddings' again
    _materialise_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"checkpoint left {len(left)} tensors unset (e.g. {left[0]})")
    return model


def _tie_state(model: ClipCaptionModel, state: dict[str, torch.Tensor]) -> bool:
    """Give a tied LM's output embeddings the input embeddings' tensor in ``state``; whether it is tied."""
    keys = lm.tied_keys(model)
    if keys is None:
        return False
    head, embed = keys
    if head in state and embed in state and not _same_tensor(state[head], state[embed]):
        raise CheckpointError("the checkpoint's lm_head differs from its token embeddings, but its LM ties them")
    if embed in state:
        state[head] = state[embed]
    return True


def _materialise_buffers(model: ClipCaptionModel) -> None:
    """Computed, unsaved buffers (rotary frequencies) are still on the meta device after assignment:
    such a module (no parameters of its own, a ``config``) is rebuilt on the CPU from its config."""
    for name, module in list(model.named_modules()):
        meta = any(b.is_meta for b in module.buffers(recurse=False))
        if not meta or next(module.parameters(recurse=False), None) is not None or not hasattr(module, "config"):
            continue
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() or (a.shape == b.shape and torch.equal(a, b))


def _meta_model(config: ModelConfig, arch: dict[str, Any]) -> ClipCaptionModel:
    """The model ``config`` and ``arch`` (``lm_architecture``) describe, on the meta device (no memory, no init)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if arch.get("model_type", lm.GPT2) != lm.GPT2:
        gpt = lm.build_meta(lm.config_from_dict(arch))
        with torch.device("meta"):
            return ClipCaptionModel(config, gpt)
    with torch.device("meta"):
        return ClipCaptionModel(
            config, GPT2LMHeadModel(GPT2Config(**{k: v for k, v in arch.items() if k != "model_type"}))
        )


def check_structure(raw: RawCheckpoint, config: ModelConfig) -> None:
    """Strictly compare the file's keys and shapes with the model ``config`` describes, without
    allocating it (the model is built on the meta device). Raises CheckpointError."""
    if not raw.has_lm:
        raise CheckpointError("checkpoint has no LM weights to check against")
    model = _meta_model(config, lm_architecture(raw))
    state = dict(raw.state)
    _tie_state(model, state)
    _check_keys(model.state_dict(), state)


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


def save(
    model: ClipCaptionModel,
    path: str | Path,
    extra_metadata: dict[str, str] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` as safetensors with its config embedded, atomically (temp file + rename).

    ``tensors``: what to write instead of the model's weights (a LoRA run's mapper and adapters, lora.py)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = model.state_dict() if tensors is None else dict(tensors)
    gpt = model.gpt
    tied = lm.tied_keys(model)
    if config.only_prefix:
        state = {k: v for k, v in state.items() if k.startswith("clip_project.")}
    elif tied is not None:
        state.pop(tied[0], None)  # shared with the input embeddings; safetensors refuses aliased tensors
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "clipcap_version": __version__,
        "config": config.to_json(),
    }
    if lm.is_gpt2(gpt.config):
        metadata["gpt2_config"] = json.dumps(
            {k: getattr(gpt.config, k) for k in GPT2_ARCH_KEYS if hasattr(gpt.config, k)}
        )
    else:  # the whole config: the architecture is rebuilt from it with no network (lm_architecture)
        metadata["lm_config"] = json.dumps(lm.record(gpt.config), sort_keys=True)
    metadata.update(extra_metadata or {})
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path
