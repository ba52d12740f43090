"""The real layouts of other language models, rehearsed offline (issue 22): docs/backbones.md's commands
for SmolLM2-135M and OPT-125m, through the installed console script, on a Hugging Face cache planted
as `from_pretrained` fills it (tests/released.py: the real configs, random weights, the tokenizers).

As tests/test_rehearsal.py does for GPT-2: the commands run as a user types them (no --offline), with
every network socket blocked and logged by an audit hook, and a test fails if anything reaches for the
network. The image tower is a tiny local open_clip folder (the towers have their own rehearsal in
tests/test_towers.py). In-process loads then assert what was built: the real architectures, the LM
recorded in the checkpoint, and the family's static stepper doing the decoding.

In the system lane (`pytest --system -m system`, CI's own job): about two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from released import OPT125M, OPT125M_CONFIG, SMOLLM2, SMOLLM2_CONFIG, plant_other_lms
from test_rehearsal import PHOTO, SITECUSTOMIZE  # the photo, and the audit hook that refuses the network

pytestmark = [pytest.mark.slow, pytest.mark.system]  # full-size LMs: the system lane (pytest --system)

TINY_CLIP = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
}
# Captions of at most this many tokens: a 30-layer LM decodes a few tokens a second on a busy 2-core CPU,
# and 20 steps exercise the same static cache path as the default 67.
MAX_LENGTH = "20"
CAPTIONS = {"red": "a red square.", "green": "a green square.", "blue": "a blue square.", "white": "a white square."}
# (hub name, extra train flags, the static stepper class's name, the real config): a frozen LM, a fully
# fine-tuned one and LoRA, so the three checkpoint kinds are rehearsed (mapper only + the hub weights;
# mapper + LM; mapper + adapters merged into the hub weights at load time).
CASES = {
    "smollm2-only-prefix": (SMOLLM2, ["--only-prefix"], "StaticLlama", SMOLLM2_CONFIG),
    "opt-full": (OPT125M, [], "StaticOPT", OPT125M_CONFIG),
    "opt-lora4": (OPT125M, ["--lora", "4"], "StaticOPT", OPT125M_CONFIG),
}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A data directory with SmolLM2-135M's and OPT-125m's hub caches (about 0.5 GB, ~15 s)."""
    home = tmp_path_factory.mktemp("lm_home")
    plant_other_lms(home)
    return home


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny open_clip model (random weights) as a ``local-dir:`` folder, as tests/conftest.py::write_tiny_clip."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four images with sidecar captions (photo.jpg + photo.txt)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("sidecars")
    for color, caption in CAPTIONS.items():
        Image.new("RGB", (48, 48), color).save(folder / f"{color}.jpg")
        (folder / f"{color}.txt").write_text(caption + "\n")
    return folder


@pytest.fixture
def run(home: Path, tmp_path: Path):
    """Run ``clipcap ARGS`` as a user would: the installed script, no offline flags, network blocked."""
    exe = shutil.which("clipcap", path=str(Path(sys.executable).parent))
    assert exe, "the clipcap console script is not installed next to this Python"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / "network.log"
    env = {k: v for k, v in os.environ.items() if k not in ("CLIPCAP_OFFLINE", "HF_HUB_OFFLINE", "CLIPCAP_DEBUG")}
    # The hooks first; a PYTHONPATH already set (a checkout run from its root) stays behind them.
    python_path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    env.update(CLIPCAP_HOME=str(home), PYTHONPATH=python_path, CLIPCAP_TEST_NET_LOG=str(net_log))
    shutil.copyfile(PHOTO, tmp_path / "photo.jpg")

    def clipcap(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([exe, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        opened = net_log.read_text() if net_log.exists() else ""
        assert opened == "", f"clipcap {' '.join(args)} reached for the network:\n{opened}\n{result.stderr}"
        assert result.returncode == 0, f"clipcap {' '.join(args)}: exit {result.returncode}\n{result.stderr}"
        return result

    clipcap.cwd = tmp_path
    return clipcap


@pytest.fixture
def in_process(home: Path, monkeypatch: pytest.MonkeyPatch):
    """In-process loads read the same planted data directory, offline."""
    monkeypatch.setenv("CLIPCAP_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CLIPCAP_OFFLINE", "1")
    return home


def _records(result: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip().startswith("{")]


@pytest.mark.parametrize("case", list(CASES))
def test_docs_train_and_caption_commands_work_offline_on_the_real_lm_layouts(
    case: str, run, in_process: Path, data: Path, clip_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    """`clipcap train DATA --lm NAME` then `clipcap caption --model run/epoch-001.safetensors photo.jpg`
    (no --lm: the checkpoint names the LM), as docs/backbones.md has them."""
    name, flags, stepper, real = CASES[case]
    clip = f"local-dir:{clip_dir}"
    args = ["train", str(data), "--lm", name, "--out", "run", "--clip", clip, "--epochs", "1", "--batch-size", "2"]
    run(*args, *flags, "--samples", "0", "--quiet")  # no sample captions of held-out images: time
    ckpt = run.cwd / "run" / "epoch-001.safetensors"
    assert ckpt.is_file()

    # The checkpoint records the LM: its hub name and its whole (real) config; a frozen LM's file
    # holds only the mapper, a fine-tuned one's the LM too.
    from clipcap_cli.weights import checkpoint

    raw = checkpoint.read(ckpt)
    assert raw.config.lm == name and raw.config.only_prefix == ("--only-prefix" in flags)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert raw.lm_config[key] == real[key], key
    if real["model_type"] == "llama":  # transformers 5 keeps rope_theta in rope_parameters
        rope = raw.lm_config.get("rope_parameters") or {}
        assert (
            raw.lm_config["num_key_value_heads"] == 3 and rope.get("rope_theta", raw.lm_config.get("rope_theta")) == 1e5
        )
    full = not ({"--only-prefix", "--lora"} & set(flags))
    assert raw.has_lm == full
    assert any(k.startswith("lora.") for k in raw.state) == ("--lora" in flags) == ("lora" in raw.metadata)
    assert raw.state["clip_project.model.2.weight"].shape[0] == raw.config.prefix_length * real["hidden_size"]

    [record] = _records(run("caption", "--model", "run/epoch-001.safetensors", "photo.jpg", "--max-length", MAX_LENGTH))
    assert record["path"] == "photo.jpg" and record["error"] is None
    assert isinstance(record["caption"], str) and record["caption"].strip()

    # In-process, on the same files: the real architecture is built, decoded by the family's static
    # stepper, and the caption is the one the script wrote.
    from clipcap_cli.decoding import decode as decoding  # where open_inference is called
    from clipcap_cli.decoding import inference
    from clipcap_cli.loading import load_model
    from clipcap_cli.weights import backbones

    opened = []
    real_open = decoding.open_inference

    def spy(*a, **kw):
        opened.append(real_open(*a, **kw))
        return opened[-1]

    monkeypatch.setattr(decoding, "open_inference", spy)
    captioner = load_model(str(ckpt), device="cpu")
    gpt = captioner.model.gpt
    assert type(gpt).__name__ == real["architectures"][0]
    assert (gpt.config.hidden_size, gpt.config.num_hidden_layers) == (real["hidden_size"], real["num_hidden_layers"])
    assert gpt.get_input_embeddings().weight.shape == (real["vocab_size"], real["hidden_size"])
    if real["model_type"] == "llama":  # the rotary frequencies of SmolLM2's theta (1e5), not Llama's default 1e4
        inv_freq = 1.0 / (1e5 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
        assert torch.allclose(gpt.model.rotary_emb.inv_freq.float(), inv_freq)
    [result] = captioner.caption([PHOTO], max_length=int(MAX_LENGTH))
    assert {type(s).__name__ for s in opened} == {stepper}
    assert result.text == record["caption"]
    # The static stepper is exact on the real shapes (GQA 9/3 heads of 64, rotary; OPT's offset positions):
    # the same tokens as the model's own forward with transformers' cache.
    monkeypatch.setattr(decoding, "open_inference", lambda model, *a, **kw: inference.ForwardStepper(model))
    [plain] = captioner.caption([PHOTO], max_length=int(MAX_LENGTH))
    assert plain.tokens == result.tokens

    # The LM's weights: a frozen LM's are the planted hub file's (read under the recorded name,
    # whatever its key layout: OPT's bare decoder.* keys), LoRA's too except where the adapters were
    # merged; a fine-tuned one's are the checkpoint's.
    embed = gpt.get_input_embeddings().weight
    planted = backbones.lm_weights(name)
    [planted_key] = [k for k in planted if k.endswith("embed_tokens.weight")]
    if not full:
        assert torch.equal(embed, planted[planted_key].float())
    if "--lora" in flags:
        [q_key] = [k for k in planted if k.endswith("layers.0.self_attn.q_proj.weight")]
        q = gpt.get_decoder().layers[0].self_attn.q_proj.weight
        assert q.shape == planted[q_key].shape and not torch.equal(q, planted[q_key].float())  # merged
        assert (q - planted[q_key].float()).abs().max() < 1e-2  # by a small low-rank step, not replaced
    if full:
        [saved_key] = [k for k in raw.state if k.startswith("gpt.") and k.endswith("embed_tokens.weight")]
        assert torch.equal(embed, raw.state[saved_key].float())
        assert not torch.equal(embed, planted[planted_key].float())  # trained: the LM moved
