"""Tiny causal LMs of each family, with tokenizers built on the spot (no hub), for tests.

``write_tiny_lm(folder, family)`` saves a random model (hidden 16-32, 2 layers) and its tokenizer
side by side, as ``save_pretrained`` leaves a real one, so ``--lm FOLDER`` loads it like a hub model:

* "gpt2": GPT-2 with a byte-level BPE (GPT-2's own scheme, on a small corpus);
* "opt": OPT with the same byte-level BPE and OPT's special tokens (</s> is BOS and EOS), and a
  projected embedding (``word_embed_proj_dim`` 16 < hidden 32, as opt-350m) so the mapper's width
  must come from the input embeddings, not ``hidden_size``;
* "llama": Llama (grouped-query attention, tied embeddings as SmolLM2) with a SentencePiece-style
  BPE with byte fallback (``▁`` for spaces, ``<0xE7>`` byte tokens), which adds BOS as Llama's does;
* "qwen2": Qwen2 (untied head, biased q/k/v) with the byte-level BPE.

Both tokenizers know a few CJK characters whole (猫, 犬) and spell the rest byte by byte.
Importable from any test file (``from lm_families import write_tiny_lm``).
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("gpt2", "opt", "llama", "qwen2")
CORPUS = [
    "a dog runs on the grass.",
    "a cat sits on a red mat.",
    "two dogs play with a ball.",
    "a man rides a horse near the sea.",
    "the cat and the dog sleep.",
    "猫が座る。",
    "犬と猫。",
    "a red square. a blue circle. a green triangle.",
]
CJK_CAPTION = "猫が座る。犬が走る。"  # 猫/犬 are whole tokens; the rest are byte tokens
SPIECE_SPACE = "\u2581"
VOCAB_SIZE = 400  # BPE vocabulary asked of the trainer (the byte alphabet and merges); +3 specials


def byte_level_tokenizer(specials: tuple[str, ...] = ("<|endoftext|>",)):
    """A GPT-2-style byte-level BPE trained on CORPUS (tokenizers' own trainer: quick, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def sentencepiece_tokenizer():
    """A Llama-style BPE: spaces as ``▁`` with one prepended, 256 ``<0xNN>`` byte-fallback tokens,
    ``<unk> <s> </s>`` first, BOS added by the post-processor (as Llama's tokenizer.json does)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)])
    # Train the merges on the normalised corpus without CJK except 猫 and 犬 (the others fall back to bytes).
    keep = set("猫犬")
    text = ["".join(c for c in normalizer.normalize_str(line) if ord(c) < 0x2E80 or c in keep) for line in CORPUS]
    trained = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[], show_progress=False)
    trained.train_from_iterator(text, trainer)
    learned = trained.get_vocab()
    merges = trained.model.get_merges() if hasattr(trained.model, "get_merges") else None
    if merges is None:  # tokenizers without get_merges: read them from the model's JSON
        import json

        merges = [
            tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in json.loads(trained.to_str())["model"]["merges"]
        ]
    vocab = {t: i for i, t in enumerate(specials + byte_tokens)}
    for token, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens(specials)
    return tok


def fast_tokenizer(family: str):
    """The family's tokenizer as transformers' ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    if family == "llama":
        return PreTrainedTokenizerFast(
            tokenizer_object=sentencepiece_tokenizer(), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        )
    if family == "opt":
        tok = byte_level_tokenizer(("<s>", "<pad>", "</s>", "<unk>"))
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer((eot,)), bos_token=eot, eos_token=eot, unk_token=eot
    )


def lm_config(family: str, vocab_size: int, tokenizer=None):
    """A tiny random config of ``family`` (hidden 32, 2 layers, 128 positions)."""
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    eos = getattr(tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    common = {"vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos}
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
    if family == "opt":
        return OPTConfig(
            hidden_size=32,
            word_embed_proj_dim=16,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=2,
            max_position_embeddings=128,
            pad_token_id=getattr(tokenizer, "pad_token_id", 1),
            **common,
        )
    llama_like = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **common,
    )
    if family == "llama":
        return LlamaConfig(tie_word_embeddings=True, **llama_like)
    if family == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, **llama_like)
    raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")


def build_lm(family: str, seed: int = 0, tokenizer=None):
    """(model, tokenizer) of ``family``, random weights from ``seed``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or fast_tokenizer(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(lm_config(family, len(tokenizer), tokenizer))
    return model.eval(), tokenizer


def write_tiny_lm(folder: Path, family: str, seed: int = 0) -> Path:
    """A tiny random ``family`` LM and its tokenizer saved in ``folder`` (``--lm folder`` loads it)."""
    model, tokenizer = build_lm(family, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
