"""The offline test kit: tiny models built on the spot, the real GPT-2 tokenizer, generated images.

Nothing here touches the network: CLIPCAP_OFFLINE and HF_HUB_OFFLINE are set for every test, and
CLIPCAP_HOME points at a temporary directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# Before transformers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CLIPCAP_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share the machine's cores: one intra-op thread each (and for the
    # subprocesses they start) instead of every process using every core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from released import write_gpt2_tokenizer  # noqa: E402  (after the environment above)

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
DATA = Path(__file__).parent / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--system",
        action="store_true",
        help="also run the system lane (tests marked system: full-size real layouts through the installed script, "
        "multi-process torchrun launches); CI runs it as its own job: pytest --system -m system",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --system, the system lane is deselected (reported as deselected, not skipped)."""
    if config.getoption("--system"):
        return
    lane = [item for item in items if item.get_closest_marker("system")]
    if lane:
        config.hook.pytest_deselected(items=lane)
        items[:] = [item for item in items if not item.get_closest_marker("system")]


REQUIRE_TOOLS = "CLIPCAP_REQUIRE_TOOLS"  # set by .ci/run: a missing system tool fails its tests instead of skipping


def need_tool(*names: str, why: str) -> str:
    """The path of the first of ``names`` on PATH. Missing: skip (a developer's machine), or fail when
    REQUIRE_TOOLS is set (CI, which installs them: a silent skip there would hide the tests)."""
    for name in names:
        if path := shutil.which(name):
            return path
    message = f"{' / '.join(names)} is not installed: {why}"
    if os.environ.get(REQUIRE_TOOLS):
        pytest.fail(f"{message} ({REQUIRE_TOOLS} is set: CI must provide it)")
    pytest.skip(message)


@pytest.fixture
def java() -> str:
    return need_tool("java", why="the Java PTBTokenizer and METEOR cannot run (Debian's default-jre-headless)")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path_factory.mktemp("clipcap_home")
    monkeypatch.setenv("CLIPCAP_HOME", str(home))
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from clipcap_cli import paths

    monkeypatch.setattr(paths.NETWORK, "offline", False)  # what an in-process `clipcap --offline` set is undone
    return home


def write_tiny_gpt2(folder: Path, seed: int = 0, n_embd: int = 32, n_layer: int = 2) -> Path:
    """A random GPT-2 with the real vocabulary (50257) but tiny width, saved as a local folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=2, n_positions=128, vocab_size=50257)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    write_gpt2_tokenizer(folder)
    return folder


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny open_clip model with random weights, as an open_clip ``local-dir:`` folder."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gpt2_tokenizer(tmp_path_factory.mktemp("gpt2_tokenizer"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_config(tiny_clip_dir: Path, tiny_gpt2_dir: Path):
    from clipcap_cli.config import ModelConfig

    return ModelConfig(
        mapping="mlp",
        prefix_length=4,
        prefix_size=TINY_CLIP_CFG["embed_dim"],
        clip_model=f"local-dir:{tiny_clip_dir}",
        clip_pretrained=None,
        gpt2=str(tiny_gpt2_dir),
    )


def build_tiny_model(config, seed: int = 0):
    """A ClipCaptionModel on ``config`` with the tiny pretrained GPT-2 and a seeded random mapper."""
    import torch

    from clipcap_cli.model import ClipCaptionModel
    from clipcap_cli.weights import backbones

    torch.manual_seed(seed)
    return ClipCaptionModel(config, backbones.load_gpt2(config.gpt2)).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> Path:
    """A full (mapper + GPT-2) tiny checkpoint saved by us."""
    from clipcap_cli.weights import checkpoint

    model = build_tiny_model(tiny_config)
    return checkpoint.save(model, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_transformer_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_config) -> Path:
    """A frozen-LM transformer-mapper tiny checkpoint (mapper weights only)."""
    from clipcap_cli.weights import checkpoint

    config = tiny_config.replace(
        mapping="transformer", prefix_length=5, clip_length=3, num_layers=2, only_prefix=True, normalize_prefix=True
    )
    model = build_tiny_model(config, seed=1)
    return checkpoint.save(model, tmp_path_factory.mktemp("ckpt") / "tiny-transformer.safetensors")


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory planted as real downloads fill it (tests/released.py): the released layouts,
    full size, random weights. Generated once per test session (about 2 GB of files)."""
    from released import plant_everything

    return plant_everything(tmp_path_factory.mktemp("planted_home"))


def make_images(folder: Path) -> dict[str, Path]:
    """Images in the modes users meet: RGB JPEG, RGBA PNG, palette, grayscale, CMYK, 16-bit, EXIF-rotated."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}
    rgb = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "RGB")
    out["rgb"] = folder / "rgb.jpg"
    rgb.save(out["rgb"], quality=95)
    out["rgba"] = folder / "rgba.png"
    rgb.convert("RGBA").save(out["rgba"])
    out["palette"] = folder / "palette.png"
    rgb.convert("P", palette=Image.ADAPTIVE).save(out["palette"])
    out["gray"] = folder / "gray.png"
    rgb.convert("L").save(out["gray"])
    out["cmyk"] = folder / "cmyk.jpg"
    rgb.convert("CMYK").save(out["cmyk"])
    out["gray16"] = folder / "gray16.png"
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(out["gray16"])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    out["exif"] = folder / "exif.jpg"
    Image.fromarray(rng.integers(0, 255, (30, 60, 3), dtype=np.uint8), "RGB").save(out["exif"], exif=exif)
    return out


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    return make_images(tmp_path / "images")
