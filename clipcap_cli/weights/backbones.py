"""The pretrained language model ClipCap stands on (transformers: GPT-2, OPT, Llama-style, ... see
``lm.py``) and the cache rule both pretrained parts follow (the CLIP side is ``clip_tower.py``), with
every cache under clipcap's data directory.

A missing model never means minutes of hub retries or a silently empty tokenizer: the cache is
asked first (``local_files_only``), and a miss on a machine that cannot download fails at once
with one line that says what to fetch. Only "not cached" errors take that path: anything else
(a corrupt file, CUDA out of memory) propagates as itself.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from clipcap_cli import paths
from clipcap_cli.errors import ModelNotAvailableError
from clipcap_cli.weights import lm
from clipcap_cli.weights.lm import local_folder

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DOWNLOAD_HINT = "run `clipcap download` with the network on"
# huggingface_hub and transformers read these at import time; setting them before the first import
# keeps telemetry and implicit token lookups off in a CLI that must work offline.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")

T = TypeVar("T")
log = logging.getLogger(__name__)


# What "not in the cache" looks like: huggingface_hub's LocalEntryNotFoundError and transformers'
# missing-file errors are OSErrors, and so is FileNotFoundError for open_clip's URL cache.
NOT_CACHED = (OSError,)


def cached_or_download(load: Callable[[bool], T], what: str, hint: str) -> T:
    """Call ``load(local_only=True)``; on a cache miss, ``load(False)`` if the network may be used.

    Only a cache miss (an OSError) falls through; other errors are real and propagate.
    """
    try:
        return load(True)
    except NOT_CACHED as cache_miss:
        miss = cache_miss
    if not paths.can_download():
        why = "offline mode is on" if paths.offline_requested() else "the network is unreachable"
        raise ModelNotAvailableError(f"{what} is not cached and {why}: {hint}") from miss
    return load(False)


# --------------------------------------------------------------------------- the language model


def is_local(name: str) -> bool:
    return local_folder(name) is not None


def _quiet_transformers() -> None:
    """transformers' own progress bars and advisory logs would mix into our stderr output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _hub_kwargs(local: bool) -> dict[str, Any]:
    return {"cache_dir": paths.hf_cache_dir(), "local_files_only": local}


GPT2_HUB_NAMES = frozenset(
    {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}
    | {f"openai-community/gpt2{s}" for s in ("", "-medium", "-large", "-xl")}
)


def _label(name: str) -> str:
    """How messages name an LM: "GPT-2" for OpenAI's, "LM" for the rest."""
    return "GPT-2" if name in GPT2_HUB_NAMES else "LM"


def _gpt2_tokenizer_files(name: str) -> bool:
    """Whether ``name``'s tokenizer is OpenAI's GPT-2 one (vocab.json + merges.txt and no tokenizer
    config of its own): GPT2TokenizerFast reads it; AutoTokenizer would need a config to pick a class."""
    folder = local_folder(name)
    if folder is None:
        return name in GPT2_HUB_NAMES
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        return False
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The LM's tokenizer from a hub name (cached under CLIPCAP_HOME) or a local folder: GPT-2's
    own for OpenAI's GPT-2, else ``AutoTokenizer``. An empty one (missing files) is refused."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    _quiet_transformers()
    cls = GPT2TokenizerFast if _gpt2_tokenizer_files(name) else AutoTokenizer
    hint = f"{DOWNLOAD_HINT}, or pass --lm DIR with the tokenizer's files"
    folder = local_folder(name)
    if folder is not None:
        try:
            tok = cls.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotAvailableError(f"the tokenizer of LM '{name}' is missing or unreadable ({first})") from exc
    else:

        def load(local: bool) -> PreTrainedTokenizerBase:
            found = cls.from_pretrained(name, **_hub_kwargs(local))
            if len(found) <= 1:  # transformers 5: missing files give an empty tokenizer, not an error
                raise FileNotFoundError(f"tokenizer '{name}' not found")
            return found

        tok = cached_or_download(load, f"{_label(name)} tokenizer '{name}'", hint)
    lm.check_tokenizer(tok, name)
    return tok


def lm_config(name: str) -> PretrainedConfig | None:
    """The architecture of the LM ``name`` names: a local folder's ``config.json``, or the hub
    model's config (cached, or downloaded when the network may be used). None when there is none
    to be had (a folder with only a tokenizer, or offline with nothing cached)."""
    from transformers import AutoConfig

    _quiet_transformers()
    folder = local_folder(name)
    if folder is not None:
        if not (folder / "config.json").is_file():
            return None
        try:
            return AutoConfig.from_pretrained(str(folder))
        except ValueError:  # a config.json without model_type: GPT-2's, as folders written before AutoConfig
            from transformers import GPT2Config

            return GPT2Config.from_pretrained(str(folder))
    try:
        return cached_or_download(
            lambda local: AutoConfig.from_pretrained(name, **_hub_kwargs(local)),
            f"{_label(name)} config '{name}'",
            DOWNLOAD_HINT,
        )
    except ModelNotAvailableError:
        return None


gpt2_config = lm_config  # the name before any causal LM could be chosen


def lm_weights(name: str) -> dict[str, torch.Tensor]:
    """The pretrained LM ``name``'s tensors (its own keys), from a local folder or the hub cache,
    without building a model (frozen-LM checkpoints carry only their mapper). Sharded files too."""
    hint = f"{DOWNLOAD_HINT}, or pass --lm DIR with the model's weights"
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    folder = local_folder(name)
    if folder is not None:
        files = [folder / f for f in names if (folder / f).is_file()]
        if not files:
            raise ModelNotAvailableError(f"LM folder {folder} has no model.safetensors or pytorch_model.bin: {hint}")
        return _read_weight_files(files[0], lambda shard: folder / shard)
    from huggingface_hub import hf_hub_download

    def load(local: bool) -> Path:
        for i, file in enumerate(names):
            try:
                return Path(hf_hub_download(name, file, **_hub_kwargs(local)))
            except OSError:
                if i == len(names) - 1:
                    raise
        raise AssertionError("unreachable")

    first = cached_or_download(load, f"{_label(name)} weights '{name}'", hint)
    return _read_weight_files(first, lambda shard: Path(hf_hub_download(name, shard, **_hub_kwargs(True))))


gpt2_weights = lm_weights


def _read_weight_files(path: Path, shard_path: Callable[[str], Path]) -> dict[str, torch.Tensor]:
    if not path.name.endswith(".index.json"):
        return read_weights(path)
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(read_weights(shard_path(shard)))
    return out


def read_weights(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (only the keys ``keep`` accepts): safetensors read key by key,
    torch files memory-mapped, so tensors left out are never read into memory."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if keep is None or keep(k.removeprefix("module."))}
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: v for k, v in state.items() if keep is None or keep(k.removeprefix("module."))}


def load_lm(name: str) -> PreTrainedModel:
    """The causal LM ``name`` with its pretrained weights, in float32, ready to train (transformers'
    own loading path). A model that is not a causal LM is refused before its weights are read."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    hint = f"{DOWNLOAD_HINT}, or pass --lm DIR"
    config = lm_config(name)
    if config is None:
        if local_folder(name) is not None:
            raise ModelNotAvailableError(f"LM folder {name} has no config.json: {hint}")
        raise ModelNotAvailableError(f"{_label(name)} weights '{name}' is not cached: {hint}")
    lm.check_causal(config, name)
    folder = local_folder(name)
    if folder is not None:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    # With peft installed, from_pretrained also looks for an adapter_config.json, and (transformers 5)
    # without our cache_dir and local_files_only: on a machine without network that lookup retried for
    # about 20 s before training started. adapter_kwargs gives it the same two as everything else.
    return cached_or_download(
        lambda local: AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, adapter_kwargs=_hub_kwargs(local), **_hub_kwargs(local)
        ),
        f"{_label(name)} weights '{name}'",
        hint,
    )


load_gpt2 = load_lm  # the name before any causal LM could be chosen
