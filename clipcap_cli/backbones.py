"""The two pretrained parts ClipCap stands on: a CLIP image encoder (open_clip) and a causal language
model (transformers: GPT-2, OPT, Llama-style, ... see ``lm.py``), with every cache under clipcap's data directory.

CLIP is built as its pretrained tag says it was trained: OpenAI's models (and the other
QuickGELU tags) get QuickGELU, which open_clip 3.x only warns about. Models are built on the
meta device and their weights assigned from the file, so nothing is initialised at random only
to be overwritten; without ``text=True`` only the image tower is kept.

A missing model never means minutes of hub retries or a silently empty tokenizer: the cache is
asked first (``local_files_only``), and a miss on a machine that cannot download fails at once
with one line that says what to fetch. Only "not cached" errors take that path: anything else
(a corrupt file, CUDA out of memory) propagates as itself.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from clipcap_cli import lm, paths
from clipcap_cli.errors import CheckpointError, ModelNotAvailableError, UsageError
from clipcap_cli.lm import local_folder

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

LOCAL_DIR = "local-dir:"
QUICK_GELU = "quick_gelu"
GELU = "gelu"
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
        return _read_weights(path)
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(_read_weights(shard_path(shard)))
    return out


def _read_weights(path: Path, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
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


# --------------------------------------------------------------------------- CLIP


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to build one open_clip model: its architecture and where its weights are."""

    name: str  # open_clip name, or local-dir:PATH
    pretrained: str | None  # the pretrained tag (or a weights file path); None for local-dir and random weights
    model_cfg: dict[str, Any]  # open_clip's model config, with quick_gelu set as the weights need
    preprocess_cfg: dict[str, Any]  # mean, std, interpolation, resize mode
    tag_cfg: dict[str, Any] | None  # open_clip's pretrained config for the tag (download locations)
    weights: Path | None = None  # a local weights file (local-dir: or a path given as `pretrained`)

    @property
    def activation(self) -> str:
        return QUICK_GELU if self.model_cfg.get("quick_gelu") else GELU

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_tower_has_gelu(self) -> bool:
        """A ViT image tower uses the activation; OpenAI's ModifiedResNets (layers given per stage) do not."""
        vision = self.model_cfg.get("vision_cfg", {})
        return "timm_model_name" not in vision and isinstance(vision.get("layers"), int)


def clip_spec(model_name: str, pretrained: str | None) -> ClipSpec:
    """The architecture ``model_name`` with ``pretrained`` weights needs (no weights are read).

    QuickGELU comes from the model's own config (``-quickgelu`` names) or from the pretrained
    tag's ``quick_gelu`` (every ``openai`` tag), so OpenAI's weights run with OpenAI's activation.
    """
    if model_name.startswith(LOCAL_DIR):
        folder = Path(model_name[len(LOCAL_DIR) :]).expanduser()
        try:
            data = json.loads((folder / "open_clip_config.json").read_text())
            model_cfg = dict(data["model_cfg"])
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"CLIP folder {folder} has no usable open_clip_config.json ({exc})") from None
        weights = next(
            (
                folder / f
                for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
                if (folder / f).is_file()
            ),
            None,
        )
        return ClipSpec(model_name, None, model_cfg, data.get("preprocess_cfg", {}), None, weights)
    import open_clip

    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=1)
        raise UsageError(f"unknown CLIP model {model_name!r}" + (f" (did you mean {close[0]}?)" if close else ""))
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else None
    weights = None
    if pretrained and not tag_cfg:
        if not Path(pretrained).expanduser().is_file():
            raise UsageError(f"CLIP {model_name} has no pretrained weights tagged {pretrained!r}")
        weights = Path(pretrained).expanduser()
    if tag_cfg and tag_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    preprocess = (
        {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg} if tag_cfg else {}
    )
    return ClipSpec(model_name, pretrained, model_cfg, preprocess, tag_cfg or None, weights)


def clip_activation(model_name: str, pretrained: str | None) -> str:
    """ "quick_gelu" or "gelu": the activation ``model_name`` with ``pretrained`` weights is built with."""
    return clip_spec(model_name, pretrained).activation


def clip_model_config(model_name: str) -> dict[str, Any] | None:
    """open_clip's architecture config for ``model_name`` (``embed_dim``, ``vision_cfg``, ...), or None for
    a name open_clip does not know. A ``local-dir:`` folder's JSON and open_clip's bundled configs are read
    as files, without importing open_clip (seconds of start-up); other names (configs registered with
    ``open_clip.add_model_config``) are asked of open_clip."""
    if model_name.startswith(LOCAL_DIR):
        try:
            return clip_spec(model_name, None).model_cfg
        except UsageError:
            return None
    import importlib.util

    found = importlib.util.find_spec("open_clip")
    for root in (found.submodule_search_locations or []) if found else []:
        bundled = Path(root) / "model_configs" / f"{model_name}.json"
        if "/" not in model_name and bundled.is_file():
            try:
                return json.loads(bundled.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                break
    import open_clip

    return open_clip.get_model_config(model_name)


def clip_embed_dim(model_name: str) -> int | None:
    """The image-embedding width of an open_clip model, read from its config (no weights, no model
    built); None for a name open_clip does not know."""
    cfg = clip_model_config(model_name)
    try:
        return int(cfg["embed_dim"]) if cfg else None
    except (KeyError, TypeError, ValueError):
        return None


def clip_image_size(model_name: str) -> tuple[int, int] | None:
    """The (height, width) of the pixels ``model_name``'s image tower takes (its config's ``image_size``)."""
    cfg = clip_model_config(model_name)
    size = (cfg or {}).get("vision_cfg", {}).get("image_size")
    if size is None:
        return None
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def default_clip_tag(model_name: str) -> str | None:
    """The pretrained tag used when none is given: ``openai`` where the model has it (the original's
    weights), else the model's only tag (``webli`` for SigLIP). None for a ``local-dir:`` model (its
    weights are in the folder). Several tags and none of them ``openai``: a one-line error listing them."""
    if model_name.startswith(LOCAL_DIR):
        return None
    import open_clip

    clip_spec(model_name, None)  # an unknown name: its own error, with a suggestion
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if "openai" in tags:
        return "openai"
    if len(tags) == 1:
        return tags[0]
    if not tags:
        raise UsageError(
            f"CLIP {model_name} has no pretrained weights in open_clip: pass --clip-pretrained FILE, "
            "or --clip-pretrained none for random weights"
        )
    raise UsageError(
        f"CLIP {model_name} has several pretrained weights: choose one with --clip-pretrained ({', '.join(tags)})"
    )


def clip_weights_file(spec: ClipSpec) -> Path | None:
    """The weights file of ``spec``: local, or open_clip's hub/URL cache under CLIPCAP_HOME (filled
    on a miss when the network may be used). None for a model with no pretrained weights."""
    if spec.weights is not None or spec.tag_cfg is None:
        return spec.weights
    cache = paths.clip_cache_dir()
    cfg = spec.tag_cfg
    what = f"CLIP {spec.name} ({spec.pretrained}) weights"

    def load(local: bool) -> Path:
        if not local:
            from open_clip.pretrained import download_pretrained

            return Path(download_pretrained(cfg, cache_dir=str(cache)))
        if cfg.get("hf_hub"):
            return _hub_cached_weights(cfg["hf_hub"], cache)
        target = cache / os.path.basename(cfg["url"])
        if not target.is_file():
            raise FileNotFoundError(target)
        return target

    return cached_or_download(load, what, f"{DOWNLOAD_HINT} to fill {cache}")


def _hub_cached_weights(hf_hub: str, cache: Path) -> Path:
    """The cached file open_clip would download for ``org/repo/[filename]``: the safetensors
    version first, as open_clip prefers it. Raises LocalEntryNotFoundError when none is cached."""
    from huggingface_hub import hf_hub_download
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    repo, filename = os.path.split(hf_hub)  # "org/repo/" means open_clip's default file names
    if not filename:
        names = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    elif filename.endswith((".bin", ".pth")):
        names = [filename[:-4] + ".safetensors", filename]
    else:
        names = [filename]
    miss: OSError | None = None
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, cache_dir=str(cache), local_files_only=True))
        except OSError as exc:
            miss = exc
    assert miss is not None
    raise miss


def build_clip(spec: ClipSpec, *, meta: bool = True) -> tuple[Any, Any]:
    """(model, preprocess) with ``spec``'s architecture; on the meta device (no memory, no random
    initialisation) unless ``meta`` is False (random weights, for models without pretrained ones)."""
    import contextlib

    import open_clip
    import torch

    device = "meta" if meta else "cpu"
    with _QuietRootLogger(), torch.device("meta") if meta else contextlib.nullcontext():
        if spec.name.startswith(LOCAL_DIR):
            model = open_clip.create_model(spec.name, load_weights=False, device=device)
        else:
            quick = bool(spec.model_cfg.get("quick_gelu"))
            model = open_clip.create_model(
                spec.name,
                pretrained=None,
                device=device,
                force_quick_gelu=quick,
                force_preprocess_cfg=spec.preprocess_cfg,
            )
    return model, image_preprocess(model.visual.preprocess_cfg)


def image_preprocess(preprocess_cfg: dict[str, Any]) -> Any:
    """The evaluation transform (PIL image -> normalised pixels) of a built tower's ``preprocess_cfg``,
    as open_clip's ``create_model_and_transforms`` makes it: the tower's image size, the weights' mean
    and std, interpolation and resize mode (``shortest`` + centre crop for OpenAI's CLIPs, ``squash``
    for SigLIP). Every image pipeline (extract, caption, serve, sharded, CLIPScore) gets its transform
    from ``load_clip``, which makes it here."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)


def load_clip(
    model_name: str,
    pretrained: str | None,
    device: torch.device | str = "cpu",
    *,
    text: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[Any, Any]:
    """(model, preprocess), in eval mode on ``device``, in ``dtype`` (default ``clip_dtype``: fp16 on
    CUDA, as the original, fp32 elsewhere).

    Without ``text`` the model is the image tower alone (``encode_image``); with it, the whole
    open_clip model (``encode_text`` too). Weights are assigned from the (memory-mapped) file
    into a model built without initialisation; a model with no pretrained weights gets random ones.
    """
    spec = clip_spec(model_name, pretrained)
    weights = clip_weights_file(spec)
    if weights is None:
        model, preprocess = build_clip(spec, meta=False)
    else:
        model, preprocess = build_clip(spec)
        _assign_clip_weights(model, weights, text)
    if not text:
        from clipcap_cli.clip_image import ClipImageEncoder

        model = ClipImageEncoder(model.visual)
    model.eval()
    return model.to(device=device, dtype=dtype or clip_dtype(device)), preprocess


def _assign_clip_weights(model: Any, weights: Path, text: bool) -> None:
    """Load ``weights`` into the meta-built ``model`` by assignment (the tensors become the model's)."""
    import torch

    keep = (lambda k: True) if text else (lambda k: k.startswith("visual."))  # noqa: E731
    state = {k.removeprefix("module."): v for k, v in _read_weights(weights, keep).items()}
    if "logit_scale" in state and model.logit_scale.ndim != state["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    expected = model.state_dict()
    wanted = {k for k in expected if keep(k)}
    given = {k for k in state if keep(k)}
    if wanted != given:
        missing, extra = sorted(wanted - given), sorted(given - wanted)
        raise CheckpointError(
            f"CLIP weights {weights.name} do not fit {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for key in wanted:
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"CLIP weights {weights.name}: {key} has shape {tuple(state[key].shape)}, "
                f"the model needs {tuple(expected[key].shape)}"
            )
    target = model if text else model.visual
    sub = {k: v for k, v in state.items() if k in wanted}
    if not text:
        sub = {k.removeprefix("visual."): v for k, v in sub.items()}
    # Weights may be stored in fp16; the model's dtype is set by the caller afterwards.
    target.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in sub.items()}, strict=True, assign=True
    )
    if text:
        # The causal text mask is a non-persistent buffer: it is not in the file, so build it here.
        n = model.attn_mask.shape[0]
        model.attn_mask = torch.empty(n, n).fill_(float("-inf")).triu_(1)
    leftover = [n for n, t in [*target.named_parameters(), *target.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"CLIP weights {weights.name} left {len(leftover)} tensors unset (e.g. {leftover[0]})")


def clip_dtype(device: torch.device | str) -> torch.dtype:
    """CLIP runs in fp16 on CUDA, as the original's ``clip.load`` did, and in fp32 elsewhere."""
    import torch

    return torch.float16 if str(device).startswith("cuda") else torch.float32


class _QuietRootLogger:
    """open_clip logs advisories ("No pretrained weights loaded", ...) on the root logger, which
    would land on the user's stderr as bare ``WARNING:root:`` lines."""

    def __enter__(self) -> None:
        root = logging.getLogger()
        self.saved = root.level
        root.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().setLevel(self.saved)
