"""Any transformers causal language model as ClipCap's decoder: its config, weights and tokenizer.

GPT-2 keeps its own path (``GPT2LMHeadModel``, the released checkpoints' key layout and recorded
architecture, see ``checkpoint.py``); every other family goes through ``AutoConfig`` /
``AutoModelForCausalLM`` / ``AutoTokenizer``. A checkpoint records the LM's full config as JSON
(``lm_config``), so the architecture is rebuilt from the file without the network.

Text conventions, the same for every family:

* captions are tokenised without special tokens: no BOS (the image prefix stands where a BOS would),
  no EOS unless decoding stops at end of text (``--stop-token eos``, see ``EOS_STOP``);
* padding is right-padding with id 0 and a mask: no model sees it (causal attention), the loss skips
  it, so a tokenizer without a pad token (Llama's) needs none;
* the stop token is the first token of ``stop_token`` ("." for the released COCO models), or the
  tokenizer's end-of-text token with ``EOS_STOP``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipcap_cli.config import EOS_STOP
from clipcap_cli.errors import CheckpointError, ModelNotAvailableError, UsageError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

GPT2 = "gpt2"
# Families whose forward is "base model, then the output embeddings" with nothing in between (no
# logit scaling or soft-capping): training runs the LM head only on the positions it scores.
BASE_THEN_HEAD = frozenset({"gpt2", "opt", "llama", "qwen2", "mistral", "gpt_neox", "gptj", "phi3"})
CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Heads that make a saved model something other than a language model (a bare base model is allowed:
# transformers gives it its LM head).
OTHER_HEAD_SUFFIXES = (
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForPreTraining",
    "ForNextSentencePrediction",
)
# Written into ``lm_config`` by transformers but not part of the architecture.
UNRECORDED_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash")
CJK_PROBE = "猫が座る"  # the tokenizer round-trip probe: ASCII and CJK must come back as they went in


def model_type(config: Any) -> str:
    return str(getattr(config, "model_type", None) or GPT2)


def is_gpt2(config: Any) -> bool:
    return model_type(config) == GPT2


def hidden_size(config: Any) -> int:
    """The width of the LM's input embeddings (what the mapper outputs per prefix token)."""
    for key in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):  # OPT-350m projects its embeddings
        value = getattr(config, key, None)
        if value:
            return int(value)
    raise CheckpointError(f"cannot tell the hidden size of a {model_type(config)} model from its config")


def max_positions(config: Any) -> int | None:
    """The LM's context window, or None when it has no fixed one."""
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None


def describe(name: str, config: Any) -> str:
    """'NAME' (family, hidden H, vocab V): how an error names one side."""
    return f"'{name}' ({model_type(config)}, hidden {hidden_size(config)}, vocab {getattr(config, 'vocab_size', '?')})"


def check_causal(config: Any, name: str) -> None:
    """Refuse a model that is not a causal LM (an encoder, an encoder-decoder), with one line."""
    from transformers import AutoModelForCausalLM

    kind = model_type(config)
    archs = list(getattr(config, "architectures", None) or [])
    causal_archs = [a for a in archs if a.endswith(CAUSAL_CLASS_SUFFIXES)]
    if getattr(config, "is_encoder_decoder", False) or type(config) not in AutoModelForCausalLM._model_mapping:
        raise UsageError(f"--lm '{name}' is a {kind} model, not a causal language model: give a decoder-only LM")
    if archs and not causal_archs and any(a.endswith(OTHER_HEAD_SUFFIXES) for a in archs):
        raise UsageError(
            f"--lm '{name}' is a {kind} model saved as {', '.join(archs)}, not a causal language model: "
            "give a decoder-only LM"
        )


def config_from_dict(data: dict[str, Any]) -> PretrainedConfig:
    """A transformers config from a recorded ``lm_config`` (``model_type`` picks the class)."""
    from transformers import AutoConfig

    data = {k: v for k, v in data.items() if k not in UNRECORDED_KEYS}
    kind = data.pop("model_type", GPT2)
    try:
        return AutoConfig.for_model(kind, **data)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"this checkpoint's LM is a {kind!r} model, which this transformers cannot build"
        ) from exc


def record(config: Any) -> dict[str, Any]:
    """The JSON a checkpoint keeps of an LM's config: everything the architecture needs, nothing else."""
    data = config.to_dict()
    return {k: v for k, v in data.items() if k not in UNRECORDED_KEYS}


def build_meta(config: Any) -> PreTrainedModel:
    """The causal LM ``config`` describes, on the meta device (no memory, no init), in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)


def base_prefix(config: Any) -> str:
    """The attribute holding the base model in the family's causal-LM class ("transformer", "model")."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return str(getattr(cls, "base_model_prefix", "model") or "model")


def state_keys(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A pretrained LM's tensors under ClipCaptionModel's keys (``gpt.`` + the causal-LM class's own).

    Hub files of some families store the base model's keys bare (GPT-2's ``h.0.*``, old OPT's
    ``decoder.*``): those get the base model's prefix.
    """
    out = {}
    for key, value in weights.items():
        key = key.removeprefix("module.")
        if not key.startswith((f"{prefix}.", "lm_head.")):
            key = f"{prefix}.{key}"
        out[f"gpt.{key}"] = value
    return out


def param_key(model: Any, tensor: torch.Tensor) -> str | None:
    """The state-dict key of ``tensor`` in ``model`` (found by identity)."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if param is tensor:
            return name
    return None


def tied_keys(model: Any) -> tuple[str, str] | None:
    """(output embedding key, input embedding key) of a ClipCaptionModel whose LM ties them, else None."""
    gpt = model.gpt
    if not getattr(gpt.config, "tie_word_embeddings", False):
        return None
    out, inp = gpt.get_output_embeddings(), gpt.get_input_embeddings()
    if out is None or inp is None:
        return None
    out_key = param_key(model, out.weight) if out.weight is not inp.weight else None
    in_key = param_key(model, inp.weight)
    if in_key is None:
        return None
    # Tied modules share one Parameter: the output key is found by its module's name instead.
    if out_key is None:
        for name, module in model.named_modules():
            if module is out:
                out_key = f"{name}.weight"
    return (out_key, in_key) if out_key else None


# --------------------------------------------------------------------------- tokenizers


def check_tokenizer(tokenizer: Any, name: str) -> None:
    """Refuse an empty tokenizer (some transformers versions return one instead of raising when its
    files are missing) or one that cannot give text back; one line naming the LM."""
    if tokenizer is None or len(tokenizer) <= 1:
        raise ModelNotAvailableError(
            f"the tokenizer of LM '{name}' is missing or has an empty vocabulary"
            f" ({0 if tokenizer is None else len(tokenizer)} tokens): give --lm a folder or hub name with its files"
        )
    probe = "a dog."
    ids = tokenizer.encode(probe, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if not ids or back.strip() != probe:
        raise ModelNotAvailableError(
            f"the tokenizer of LM '{name}' does not round-trip text ({probe!r} came back as {back!r}):"
            " its files are incomplete"
        )


def check_vocab(tokenizer: Any, config: Any, name: str) -> None:
    """Refuse a tokenizer that makes ids the LM has no embedding for."""
    vocab = getattr(config, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        # Added special tokens beyond the vocabulary are harmless only if never produced; a base
        # vocabulary larger than the LM's is a mismatch.
        if tokenizer.vocab_size > vocab:
            raise UsageError(
                f"the tokenizer of '{name}' has {tokenizer.vocab_size} tokens, the LM {describe(name, config)} only "
                f"{vocab}: they do not belong together"
            )


def eos_id(tokenizer: Any, name: str = "the LM") -> int:
    """The tokenizer's end-of-text id (what ``--stop-token eos`` stops at)."""
    found = getattr(tokenizer, "eos_token_id", None)
    if found is None:
        raise UsageError(f"the tokenizer of {name} has no end-of-text token: give --stop-token a text token")
    return int(found)


def stop_id(tokenizer: Any, stop_token: str) -> int:
    """The id decoding stops at: the first token of ``stop_token`` (13 for "." in GPT-2, as the
    original), or the end-of-text id for ``EOS_STOP``."""
    if stop_token == EOS_STOP:
        return eos_id(tokenizer)
    # A token spelled exactly so ("." in GPT-2 and Llama vocabularies alike): SentencePiece tokenizers
    # would encode a lone "." as "▁." (a space and a full stop), which ends no caption.
    found = tokenizer.convert_tokens_to_ids(stop_token)
    if isinstance(found, int) and found != getattr(tokenizer, "unk_token_id", None):
        return found
    ids = tokenizer.encode(stop_token, add_special_tokens=False)
    after_word = tokenizer.encode("a" + stop_token, add_special_tokens=False)
    word = tokenizer.encode("a", add_special_tokens=False)
    if after_word[: len(word)] == word and len(after_word) > len(word):
        ids = after_word[len(word) :]  # how the stop text is spelled after a word, as in a caption
    if not ids:
        raise UsageError(f"stop token {stop_token!r} encodes to no token")
    return int(ids[0])


def local_folder(name: str) -> Path | None:
    """The folder ``name`` names, or None for a Hugging Face name. A name written as a path (``/``, ``./``,
    ``../``, ``~``) or naming a file is refused in one line: it can only mean a folder, and sending it to the
    hub would only say "not cached"."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name.startswith(("/", "./", "../", "~")) or path.exists():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise UsageError(
            f"language model {name}: {what}; give a folder saved by save_pretrained (config.json, the weights, "
            "the tokenizer's files) or a Hugging Face name"
        )
    return None


class EosAppended:
    """A tokenizer whose captions end with its end-of-text token (training with ``--stop-token eos``).

    Everything else is the wrapped tokenizer's; its class name differs, so the token cache (keyed
    by the tokenizer's class and vocabulary) never mixes the two.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos = eos_id(tokenizer)

    def __call__(self, texts: Any, **kwargs: Any) -> dict[str, Any]:
        out = self.tokenizer(texts, **kwargs)
        ids = out["input_ids"]
        return {
            **dict(out),
            "input_ids": [[*seq, self.eos] for seq in ids] if ids and isinstance(ids[0], list) else [*ids, self.eos],
        }

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)


def training_tokenizer(tokenizer: Any, stop_token: str) -> Any:
    """The tokenizer training encodes captions with: ``tokenizer``, or ``EosAppended`` for ``EOS_STOP``."""
    return EosAppended(tokenizer) if stop_token == EOS_STOP else tokenizer
