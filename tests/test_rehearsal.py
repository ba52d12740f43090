"""The real configuration, rehearsed offline: the README's commands on a data directory planted
exactly as real downloads fill it (the released checkpoint layouts, open_clip's hub cache for
OpenAI's ViT-B/32 and RN50x4, GPT-2's tokenizer and config in the Hugging Face cache), with the
real architectures and random weights.

The commands run through the installed console script, as a user types them (no --offline), with
every network socket blocked and logged by an audit hook: a test fails if anything reaches for the
network. In-process loads then assert which architectures were built.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from released import CLIP_HUB_REPOS, HF_REVISION

pytestmark = [pytest.mark.slow, pytest.mark.system]  # the system lane: pytest --system
PHOTO = Path(__file__).parent / "data" / "photos" / "COCO_val2014_000000354533.jpg"
SITECUSTOMIZE = """
import os, socket, sys
_log = os.environ["CLIPCAP_TEST_NET_LOG"]
def _hook(event, args):
    inet = event == "socket.__new__" and args[1] in (socket.AF_INET, socket.AF_INET6)
    if inet or event in ("socket.getaddrinfo", "socket.gethostbyname"):
        with open(_log, "a") as f:
            f.write(f"{event} {args[1:]!r}\\n")
        raise OSError(f"network blocked by the test ({event})")
sys.addaudithook(_hook)
"""


@pytest.fixture
def run(planted: Path, tmp_path: Path):
    """Run ``clipcap ARGS`` as a user would: the installed script, no offline flags, network blocked."""
    exe = shutil.which("clipcap", path=str(Path(sys.executable).parent))
    assert exe, "the clipcap console script is not installed next to this Python"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPCAP_OFFLINE", "HF_HUB_OFFLINE", "CLIPCAP_DEBUG")}
    env.update(CLIPCAP_HOME=str(planted), PYTHONPATH=str(hooks), CLIPCAP_TEST_NET_LOG=str(net_log))
    shutil.copyfile(PHOTO, tmp_path / "photo.jpg")

    def clipcap(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        opened = net_log.read_text() if net_log.exists() else ""
        assert opened == "", f"clipcap {' '.join(args)} reached for the network:\n{opened}\n{result.stderr}"
        if ok:
            assert result.returncode == 0, f"clipcap {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
        return result

    clipcap.cwd = tmp_path
    return clipcap


def _records(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


# The MLP and the transformer mapper; "conceptual" is the same MLP architecture in another file (its
# registry entry differs from coco's only in its file name and hash, and the conversion is the same code).
@pytest.mark.parametrize("extra", [[], ["--model", "coco-transformer"]])
def test_readme_caption_commands_work_offline_on_the_real_layouts(run, planted: Path, extra: list[str]):
    """`clipcap caption photo.jpg` exactly as in the README (the first use converts the download)."""
    [record] = _records(run("caption", "photo.jpg", *extra))
    assert record["path"] == "photo.jpg" and record["error"] is None
    assert isinstance(record["caption"], str) and record["caption"]
    name = {"": "coco_weights", "coco-transformer": "coco_transformer_weights"}
    assert (planted / "models" / f"{name[extra[1] if extra else '']}.safetensors").is_file()  # converted once


def test_readme_download_list_and_eval_work_offline(run, tmp_path: Path):
    listing = json.loads(run("download", "--list").stdout)  # a pipe: JSON
    assert {r["name"]: r["cached"] for r in listing} == {"coco": True, "conceptual": True, "coco-transformer": True}
    assert all(r["verified_by"] == "huggingface.co" for r in listing)

    references = ["a red motorcycle parked on a dirt field.", "a motorbike in the desert."]
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps({"image": "photo.jpg", "captions": references}) + "\n")
    preds = tmp_path / "preds.jsonl"
    report = json.loads(
        run(
            "eval",
            "--refs",
            str(refs),
            "--images",
            str(tmp_path),
            "--model",
            "coco",
            "--metrics",
            "BLEU,CIDEr",
            "--save-predictions",
            str(preds),
        ).stdout
    )
    assert report["counts"]["images"] == 1
    # The scores are those of the caption the model wrote, recomputed here from the saved prediction.
    [saved] = [json.loads(line) for line in preds.read_text().splitlines()]
    from clipcap_cli.eval import metrics

    again = metrics.score(
        {"photo.jpg": references},
        {"photo.jpg": saved["caption"]},
        metrics=["BLEU", "CIDEr"],
        tokenizer=report["tokenizer"],
    )
    assert again.scores["CIDEr"] == pytest.approx(report["metrics"]["CIDEr"], abs=1e-9)
    assert again.scores["BLEU-4"] == pytest.approx(report["metrics"]["BLEU-4"], abs=1e-9)


def test_default_extract_uses_openai_quickgelu_vit(run, planted: Path, tmp_path: Path):
    """`clipcap extract` with the default CLIP gives the features of a QuickGELU ViT-B/32 on the
    planted weights (1e-5), not those of the GELU model open_clip builds by default."""
    import open_clip
    from safetensors.torch import load_file

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copyfile(PHOTO, photos / "photo.jpg")
    run("extract", "photos", "--out", "feats")
    from clipcap_cli.data.features import load_features

    store = load_features(tmp_path / "feats")
    assert store.meta["clip_activation"] == "quick_gelu"
    weights = load_file(
        str(
            planted
            / "open_clip"
            / f"models--{CLIP_HUB_REPOS[('ViT-B-32', 'openai')].replace('/', '--')}"
            / "snapshots"
            / HF_REVISION
            / "open_clip_model.safetensors"
        )
    )
    pixels = None
    outputs = {}
    for quick in (True, False):
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", force_quick_gelu=quick)
        model.load_state_dict(weights)
        from clipcap_cli.data.images import open_rgb

        pixels = preprocess(open_rgb(photos / "photo.jpg")).unsqueeze(0)
        with torch.no_grad():
            outputs[quick] = model.eval().encode_image(pixels)[0]
    got = store.embeddings[0].float()
    assert (got - outputs[True]).abs().max() < 1e-5
    assert (got - outputs[False]).abs().max() > 1e-3  # the GELU model really is different

    # A store from clipcap 0.1 (no activation recorded: made with GELU) is never topped up.
    meta = json.loads((tmp_path / "feats" / "meta.json").read_text())
    meta.pop("clip_activation")
    meta["run_settings"].pop("clip_activation")
    (tmp_path / "feats" / "meta.json").write_text(json.dumps(meta))
    result = run("extract", "photos", "--out", "feats", ok=False)
    assert result.returncode == 2
    assert "CLIP activation gelu then, quick_gelu now" in result.stderr and "--overwrite" in result.stderr


def test_the_built_architectures_are_the_real_ones(planted: Path, monkeypatch: pytest.MonkeyPatch):
    from clipcap_cli.data.clip_image import ClipImageEncoder
    from clipcap_cli.loading import load_model

    monkeypatch.setenv("CLIPCAP_HOME", str(planted))
    acts = lambda m: {type(x).__name__ for x in m.modules() if type(x).__name__ in ("GELU", "QuickGELU")}  # noqa: E731

    for name in ("coco", "conceptual"):
        captioner = load_model(name, device="cpu")
        config = captioner.config
        assert (config.mapping, config.prefix_length, config.prefix_size, config.normalize_prefix) == (
            "mlp",
            10,
            512,
            False,
        )
        assert isinstance(captioner.clip_model, ClipImageEncoder)  # the image tower alone
        assert type(captioner.clip_model.visual).__name__ == "VisionTransformer"
        assert acts(captioner.clip_model) == {"QuickGELU"}
        assert captioner.model.gpt.config.n_head == 12 and captioner.model.gpt.config.n_layer == 12
        del captioner
        gc.collect()

    captioner = load_model("coco-transformer", device="cpu")
    config = captioner.config
    assert (config.mapping, config.prefix_length, config.clip_length, config.num_layers) == ("transformer", 40, 40, 8)
    assert (config.prefix_size, config.clip_model, config.normalize_prefix) == (640, "RN50x4", True)
    assert type(captioner.clip_model.visual).__name__ == "ModifiedResNet"
    with torch.no_grad():
        pixels = captioner.preprocess(PHOTO).unsqueeze(0)
        assert pixels.shape[-1] == 288  # RN50x4's input size
        assert captioner.encode_pixels(pixels).shape == (1, 640)
    # The normalised prefix: scaling the CLIP embedding does not change the transformer's prefix.
    emb = torch.randn(2, 640)
    with torch.no_grad():
        assert torch.allclose(captioner.model.embed_prefix(emb), captioner.model.embed_prefix(emb * 7), atol=1e-5)
