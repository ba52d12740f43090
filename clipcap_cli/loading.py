"""Loading a captioner: a registry name or a checkpoint file in, a ready ``Captioner`` out.

One straight path, top to bottom (``load_model``):

1. resolve the name to a verified file (``pretrained``: registry, download, sha256);
2. read the tensors and the config (``checkpoint``; a downloaded ``.pt`` is converted once into
   safetensors beside it), and the LM architecture the checkpoint records or the user named (``backbones``);
3. build the modules without initialising them (the meta device);
4. load the weights, by assignment;
5. attach CLIP (its image tower) and the tokenizer (``backbones``).

Each lower module is called from here and none of them calls back up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcap_cli.captioner import Captioner
from clipcap_cli.decoding.precision import DEFAULT_PRECISION, apply_clip_precision, apply_precision, resolve_precision
from clipcap_cli.errors import CheckpointError
from clipcap_cli.weights import backbones, checkpoint, clip_tower
from clipcap_cli.weights import lm as lm_module
from clipcap_cli.weights import registry as pretrained

if TYPE_CHECKING:
    import torch

    from clipcap_cli.model import ClipCaptionModel

Progress = Callable[[int, "int | None"], None]
log = logging.getLogger(__name__)


def load_model(
    name_or_path: str = "coco",
    device: str | torch.device | None = None,
    clip_model: str | None = None,
    clip_pretrained: str | None = None,
    lm: str | None = None,
    normalize_prefix: bool | None = None,
    precision: str = DEFAULT_PRECISION,
    *,
    download_progress: Progress | None = None,
    gpt2: str | None = None,
) -> Captioner:
    """Load a registry model ("coco", "conceptual", "coco-transformer") or a checkpoint file.

    Args:
        name_or_path: registry name (downloaded on first use) or checkpoint path.
        device: "cpu", "cuda", "cuda:1", "mps"; None picks the best available.
        clip_model, clip_pretrained, lm, normalize_prefix: override what the checkpoint
            (or the registry entry) implies; None keeps it.
        precision: "auto" (fp32: exact), "fp32", "bf16", "fp16" (CUDA), "int8" (CPU) or "fast" (the
            fastest of these on this hardware), see ``precision.py``. With bf16 on the CPU, CLIP runs in
            bf16 too (most of its speed-up comes from there); with int8, CLIP's linear layers are int8 too.
            bf16 on a CPU without native bf16 runs in fp32, with a warning.
        download_progress: ``progress(done_bytes, total_bytes)`` while a registry model downloads.
        gpt2: ``lm``'s name before any causal LM could be chosen.
    """
    from clipcap_cli.device import pick_device

    dev = pick_device(str(device) if device is not None else None)
    resolved = resolve_precision(precision, dev)  # a precision the device lacks fails before any loading
    user = {
        "clip_model": clip_model,
        "clip_pretrained": clip_pretrained,
        "lm": lm if lm is not None else gpt2,
        "normalize_prefix": normalize_prefix,
    }
    model = load_network(name_or_path, dev, download_progress=download_progress, **user)
    apply_precision(model, resolved)  # int8: quantised here, once
    config = model.config
    clip, preprocess = clip_tower.load_clip(config.clip_model, config.clip_pretrained, dev)  # 5.
    apply_clip_precision(clip, resolved, dev)  # bf16 on the CPU, or int8
    tokenizer = backbones.load_tokenizer(config.lm)
    lm_module.check_vocab(tokenizer, model.gpt.config, config.lm)
    return Captioner(model, clip, preprocess, tokenizer, dev)


def load_network(
    name_or_path: str,
    device: str | torch.device = "cpu",
    *,
    download_progress: Progress | None = None,
    **overrides: Any,
) -> ClipCaptionModel:
    """Steps 1-4 of ``load_model``: the ClipCaptionModel alone (mapper and LM), in eval mode.

    ``overrides`` are ModelConfig fields (clip_model=, normalize_prefix=, lm=, ...; ``gpt2=`` is
    ``lm=``); None keeps what the checkpoint says or the registry implies.
    """
    if "gpt2" in overrides:  # the name before any causal LM could be chosen
        old = overrides.pop("gpt2")
        if overrides.get("lm") is None:
            overrides["lm"] = old
    path, implied = pretrained.resolve(name_or_path, progress=download_progress)  # 1.
    raw = read_checkpoint(path, converted=name_or_path in pretrained.REGISTRY)  # 2.
    config = checkpoint.resolve_config(raw, **{**implied, **{k: v for k, v in overrides.items() if v is not None}})
    trained_on = raw.config.clip_model if raw.config else implied.get("clip_model")
    if overrides.get("clip_model") not in (None, trained_on) and overrides.get("clip_pretrained") is None:
        config = config.replace(clip_pretrained=clip_tower.default_clip_tag(config.clip_model))  # --clip's own weights
    checkpoint.check_clip(config, clip_tower.clip_embed_dim(config.clip_model), trained_on)
    recorded = raw.lm_config is not None or raw.gpt2_config is not None
    named_lm = overrides.get("lm") is not None or not recorded or not raw.has_lm
    named = backbones.lm_config(config.lm) if named_lm else None
    if named is not None:
        lm_module.check_causal(named, config.lm)
    lm_tensors = None
    if not raw.has_lm:  # a frozen-LM file: the pretrained LM's weights, under the family's keys
        family = named if named is not None else (lm_module.config_from_dict(raw.lm_config) if raw.lm_config else None)
        prefix = (
            lm_module.base_prefix(family) if family is not None and not lm_module.is_gpt2(family) else "transformer"
        )
        lm_tensors = checkpoint.lm_state(backbones.lm_weights(config.lm), prefix)
    arch = checkpoint.lm_architecture(raw, named, config.lm, lm_tensors)
    model = checkpoint.build_model(raw, config, arch, lm_tensors)  # 3. and 4.
    return model.to(device).eval()


def read_checkpoint(path: Path, *, converted: bool = False) -> checkpoint.RawCheckpoint:
    """Read ``path``; with ``converted`` (a downloaded registry file), through its safetensors copy,
    made on first use."""
    if converted and path.suffix == ".pt":
        try:
            path = checkpoint.to_safetensors(path)
        except OSError as exc:  # a read-only or full models folder: the .pt itself still loads
            log.warning(
                "could not convert %s to safetensors (%s); loading the .pt as it is", path.name, exc.strerror or exc
            )
    return checkpoint.read(path)


def verify_download(model: pretrained.PretrainedModel) -> Path:
    """Check a downloaded registry file strictly (keys and shapes, the CLIP it needs) and convert it
    to safetensors, so the first caption is fast. A file that is not the model is deleted."""
    try:
        raw = read_checkpoint(model.path, converted=True)
        config = checkpoint.resolve_config(raw, **model.settings)
        checkpoint.check_structure(raw, config)
        checkpoint.check_clip(config, clip_tower.clip_embed_dim(model.clip[0]))
    except CheckpointError as exc:
        model.path.unlink(missing_ok=True)
        model.path.with_suffix(".safetensors").unlink(missing_ok=True)
        raise CheckpointError(
            f"model '{model.name}': the downloaded file is not a valid checkpoint ({exc}); removed"
        ) from exc
    return model.path
