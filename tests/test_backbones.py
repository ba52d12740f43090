from pathlib import Path

import pytest
import torch

from clipcap_cli import paths
from clipcap_cli.config import CLIP_FOR_DIM
from clipcap_cli.device import pick_device
from clipcap_cli.errors import ModelNotAvailableError, UsageError
from clipcap_cli.weights import backbones, clip_tower


def test_real_gpt2_tokenizer_from_local_folder(gpt2_tokenizer_dir: Path):
    tok = backbones.load_tokenizer(str(gpt2_tokenizer_dir))
    assert len(tok) == 50257
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(".") == [13]  # the original's stop token id


def test_missing_models_fail_fast_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Offline, a missing model is one line at once: nothing is looked up or connected to (no timeout waited)."""
    import socket

    reached: list[str] = []

    def refuse(what: str):
        def call(*args, **kwargs):
            reached.append(what)
            raise OSError(f"the test blocks {what}")

        return call

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    with pytest.raises(ModelNotAvailableError, match="GPT-2 tokenizer 'gpt2' is not cached and offline mode is on"):
        backbones.load_tokenizer("gpt2")
    with pytest.raises(ModelNotAvailableError, match="GPT-2 weights 'gpt2'"):
        backbones.load_gpt2("gpt2")
    with pytest.raises(ModelNotAvailableError, match=r"CLIP ViT-B-32 \(openai\) weights is not cached"):
        clip_tower.load_clip("ViT-B-32", "openai")
    assert reached == []


def test_empty_tokenizer_folder_is_refused(tmp_path: Path):
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ModelNotAvailableError, match="empty vocabulary"):
        backbones.load_tokenizer(str(tmp_path))


def test_tiny_clip_from_local_dir(tiny_clip_dir: Path):
    model, preprocess = clip_tower.load_clip(f"local-dir:{tiny_clip_dir}", None)
    assert clip_tower.clip_embed_dim(f"local-dir:{tiny_clip_dir}") == 32
    from PIL import Image

    x = preprocess(Image.new("RGB", (50, 40), "red")).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert model.encode_image(x).shape == (1, 32)


def test_clip_names_are_checked():
    with pytest.raises(UsageError, match="did you mean ViT-B-32"):
        clip_tower.load_clip("ViT-B-23", "openai")
    with pytest.raises(UsageError, match="no pretrained weights tagged 'openia'"):
        clip_tower.load_clip("ViT-B-32", "openia")


def test_clip_widths_are_read_from_open_clip_configs():
    """Widths come from open_clip's own configs (no table to fall out of date), and the guess table for
    files that record no CLIP agrees with them."""
    import open_clip

    for name in ("RN50x4", "RN50x64", "ViT-B-16", "ViT-L-14-336", "ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP"):
        assert clip_tower.clip_embed_dim(name) == open_clip.get_model_config(name)["embed_dim"], name
    for dim, name in CLIP_FOR_DIM.items():
        assert clip_tower.clip_embed_dim(name) == dim, name
    assert clip_tower.clip_embed_dim("ViT-B-23") is None


def _quickgelu_tags() -> list[tuple[str, str]]:
    import open_clip

    return [
        (m, t) for m, t in open_clip.list_pretrained() if (open_clip.get_pretrained_cfg(m, t) or {}).get("quick_gelu")
    ]


def _activations(module) -> set[str]:
    return {type(m).__name__ for m in module.modules() if type(m).__name__ in ("GELU", "QuickGELU")}


@pytest.mark.slow
def test_every_quickgelu_tag_builds_quickgelu():
    """open_clip 3.x builds ViT-B-32 with nn.GELU even for the `openai` tag (it only warns). Every
    tag trained with QuickGELU must get it, in both towers (the models are built on the meta
    device: no weights, no memory)."""
    tags = _quickgelu_tags()
    assert ("ViT-B-32", "openai") in tags and ("RN50x4", "openai") in tags and len(tags) >= 10
    for name, tag in tags:
        spec = clip_tower.clip_spec(name, tag)
        assert spec.activation == clip_tower.QUICK_GELU, (name, tag)
        model, _ = clip_tower.build_clip(spec)
        assert _activations(model) == {"QuickGELU"}, (name, tag)
    # ... and a tag trained with GELU keeps GELU, so the rule is the tag's, not "always QuickGELU".
    laion = clip_tower.clip_spec("ViT-B-32", "laion2b_s34b_b79k")
    assert laion.activation == clip_tower.GELU
    assert _activations(clip_tower.build_clip(laion)[0]) == {"GELU"}


@pytest.mark.slow
def test_openai_vit_b32_image_features_are_quickgelu(tmp_path: Path):
    """The image tower clipcap builds for ViT-B-32/openai equals open_clip's QuickGELU model on the
    same weights, and differs measurably from the GELU model open_clip builds by default."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", force_quick_gelu=True).eval()
    gelu = open_clip.create_model("ViT-B-32").eval()
    gelu.load_state_dict(reference.state_dict())
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    # A file given as `pretrained` carries no activation: name the QuickGELU architecture.
    ours, _ = clip_tower.load_clip("ViT-B-32-quickgelu", str(weights))
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want, got, wrong = reference.encode_image(pixels), ours.encode_image(pixels), gelu.encode_image(pixels)
    assert (got - want).abs().max() < 1e-5
    assert (wrong - want).abs().max() > 1e-3


def test_image_tower_alone_and_both_towers_match_open_clip(tiny_clip_dir: Path):
    import open_clip

    reference, _, ref_preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_clip_dir}")
    reference.eval()
    image_only, preprocess = clip_tower.load_clip(f"local-dir:{tiny_clip_dir}", None)
    assert not hasattr(image_only, "encode_text") and not any(
        n.startswith("transformer") for n, _ in image_only.named_parameters()
    )
    full, _ = clip_tower.load_clip(f"local-dir:{tiny_clip_dir}", None, text=True)
    assert repr(preprocess) == repr(ref_preprocess)
    pixels = torch.randn(3, 3, 32, 32)
    tokens = open_clip.get_tokenizer(f"local-dir:{tiny_clip_dir}")(["a red square", "two dogs on a beach"])
    with torch.no_grad():
        assert torch.equal(image_only.encode_image(pixels), reference.encode_image(pixels))
        assert torch.equal(full.encode_image(pixels), reference.encode_image(pixels))
        assert torch.equal(full.encode_text(tokens), reference.encode_text(tokens))


def test_only_cache_misses_fall_through_to_the_network(monkeypatch: pytest.MonkeyPatch):
    """A cache miss offline is 'not cached'; any other failure (CUDA out of memory, a bug) is
    reported as itself, never as a missing download."""
    calls = []

    def out_of_memory(local: bool):
        calls.append(local)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):
        backbones.cached_or_download(out_of_memory, "CLIP", "hint")
    assert calls == [True]

    def missing(local: bool):
        raise FileNotFoundError("not in the cache")

    with pytest.raises(ModelNotAvailableError, match="CLIP x is not cached and offline mode is on"):
        backbones.cached_or_download(missing, "CLIP x", "hint")


def test_cache_lookups_leave_huggingface_hub_settings_alone(monkeypatch: pytest.MonkeyPatch):
    """The cache-first lookup asks for local files; it must not flip huggingface_hub's global
    offline switch, which other threads and a user's own code in the process rely on."""
    from huggingface_hub import constants
    from transformers import GPT2TokenizerFast

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    seen = []

    def spy(name, **kwargs):
        seen.append((constants.HF_HUB_OFFLINE, kwargs.get("local_files_only")))
        raise OSError("not cached")

    monkeypatch.setattr(GPT2TokenizerFast, "from_pretrained", spy)
    with pytest.raises(ModelNotAvailableError):
        backbones.load_tokenizer("gpt2")
    assert seen == [(False, True)]  # asked the cache only, with the global switch untouched


def test_home_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CLIPCAP_HOME", str(tmp_path / "h"))
    assert paths.home() == tmp_path / "h"
    assert paths.models_dir().is_dir() and paths.models_dir().parent == tmp_path / "h"
    monkeypatch.delenv("CLIPCAP_HOME")
    assert "clipcap" in str(paths.home())


def test_device_choice():
    assert pick_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert pick_device(None).type == "cuda" and pick_device("cuda:0") == torch.device("cuda", 0)
    else:
        assert pick_device(None).type == ("mps" if torch.backends.mps.is_available() else "cpu")
        with pytest.raises(UsageError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(UsageError, match="unknown device"):
        pick_device("tpu9")
