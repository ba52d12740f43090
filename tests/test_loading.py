"""The loading path: the GPT-2 the user names is the GPT-2 that is built, models are assigned
their weights without random initialisation, and a registry .pt is converted to safetensors once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from original_clipcap import ref_beam, ref_greedy

from clipcap_cli import loading
from clipcap_cli.config import ModelConfig
from clipcap_cli.decoding.decode import beam_search, greedy
from clipcap_cli.errors import CheckpointError
from clipcap_cli.weights import checkpoint

STOP = 13
MAX = 16


def _gpt2_config(**kw):
    from transformers import GPT2Config

    base = dict(vocab_size=2000, n_embd=64, n_layer=2, n_head=2, n_positions=128, bos_token_id=1999, eos_token_id=1999)
    return GPT2Config(**{**base, **kw})


@pytest.fixture(scope="module")
def narrow_heads(tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path):
    """A released-style file (bare state dict, no config) whose GPT-2 has 2 heads of 32: shape
    inference alone (64-wide heads, as every real GPT-2 size) would build 1 head of 64."""
    from transformers import GPT2LMHeadModel

    from clipcap_cli.model import ClipCaptionModel

    root = tmp_path_factory.mktemp("narrow")
    torch.manual_seed(0)
    config = ModelConfig(mapping="mlp", prefix_length=4, prefix_size=32)
    model = ClipCaptionModel(config, GPT2LMHeadModel(_gpt2_config())).eval()
    with torch.no_grad():
        # Random GPT-2 weights attend almost uniformly, and then the heads' split hardly matters:
        # sharpen the attention so that it does, as it does in a trained model.
        for block in model.gpt.transformer.h:
            block.attn.c_attn.weight.mul_(12)
        # '.' gets a row of its own whose logit swings with the context, so beams stop.
        head = model.gpt.transformer.wte.weight.detach().clone()
        head[STOP] = torch.randn(head.shape[1]) * 3
        model.gpt.transformer.wte.weight.copy_(head)
    path = root / "released.pt"
    torch.save(model.state_dict(), path)
    gpt2_dir = root / "gpt2"
    _gpt2_config().save_pretrained(gpt2_dir)
    return path, gpt2_dir, model.double(), f"local-dir:{tiny_clip_dir}"


def _prefixes(model, n=8):
    clips = torch.randn(n, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        return model.embed_prefix(clips)


def test_named_gpt2_config_sets_the_heads(narrow_heads):
    path, gpt2_dir, reference, clip = narrow_heads
    ours = loading.load_network(str(path), gpt2=str(gpt2_dir), clip_model=clip).double()
    assert (ours.gpt.config.n_head, ours.gpt.config.n_embd) == (2, 64)
    prefix = _prefixes(ours)
    beams = beam_search(ours, prefix, 5, MAX, STOP)
    greedies = greedy(ours, prefix, MAX, STOP)
    lengths = set()
    for i in range(len(prefix)):
        with torch.no_grad():
            ref = ref_beam(reference, prefix[i : i + 1], 5, MAX, STOP)
            assert greedies[i][0] == ref_greedy(reference, prefix[i : i + 1], MAX, STOP)
        assert [t for t, _ in beams[i]] == [t for t, _ in ref], f"image {i}"
        lengths |= {len(t) for t, _ in ref}
    assert len(lengths) >= 2  # stopping really happened

    # Without the config (offline, nothing cached), the shapes alone build 1 head of 64: other captions.
    guessed = loading.load_network(str(path), clip_model=clip).double()
    assert guessed.gpt.config.n_head == 1
    other = beam_search(guessed, prefix, 5, MAX, STOP)
    assert any([t for t, _ in other[i]] != [t for t, _ in beams[i]] for i in range(len(prefix)))


def test_disagreeing_gpt2_config_is_a_clear_error(narrow_heads, tmp_path: Path):
    path, _, _, clip = narrow_heads
    wide = tmp_path / "wide"
    _gpt2_config(n_embd=128, n_head=4).save_pretrained(wide)
    with pytest.raises(
        CheckpointError,
        match=r"GPT-2 config from GPT-2 '.*wide' does not fit this checkpoint's GPT-2 "
        r"tensors \(n_embd 128 in the config, 64 in the tensors",
    ):
        loading.load_network(str(path), gpt2=str(wide), clip_model=clip)
    odd = tmp_path / "odd"
    _gpt2_config(n_head=3).save_pretrained(odd)
    with pytest.raises(CheckpointError, match="n_embd 64 is not a multiple of n_head 3"):
        loading.load_network(str(path), gpt2=str(odd), clip_model=clip)


def test_our_checkpoint_refuses_a_gpt2_that_disagrees_with_its_record(tiny_checkpoint: Path, tmp_path: Path):
    """Our files record their GPT-2; naming another GPT-2 with other heads is refused, not mixed."""
    other = tmp_path / "other"
    raw = checkpoint.read(tiny_checkpoint)
    _gpt2_config(
        **{k: raw.gpt2_config[k] for k in ("vocab_size", "n_embd", "n_layer", "n_positions")},
        n_head=raw.gpt2_config["n_head"] * 2,
    ).save_pretrained(other)
    with pytest.raises(CheckpointError, match="GPT-2 configs disagree"):
        loading.load_network(str(tiny_checkpoint), gpt2=str(other))


def test_models_are_built_without_random_initialisation(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    """Loading assigns the file's tensors to a model built on the meta device: no init kernel runs
    (they cost seconds at full size, only to be overwritten)."""
    calls = []  # torch.nn.init's functions all end in these two in-place kernels
    for tensor_method in ("normal_", "uniform_"):
        real_method = getattr(torch.Tensor, tensor_method)

        def method_spy(self, *args, _real=real_method, _name=tensor_method, **kwargs):
            if not self.is_meta:
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, tensor_method, method_spy)
    model = loading.load_network(str(tiny_checkpoint))
    assert calls == []
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.gpt.lm_head.weight is model.gpt.transformer.wte.weight  # still tied after assignment


def test_registry_pt_is_converted_once_and_checked(narrow_heads, tmp_path: Path):
    path, gpt2_dir, _, _ = narrow_heads
    pt = tmp_path / "copy.pt"
    pt.write_bytes(path.read_bytes())
    converted = checkpoint.to_safetensors(pt)
    assert converted == pt.with_suffix(".safetensors")
    a, b = checkpoint.read(pt).state, checkpoint.read(converted).state
    assert set(b) == set(a) - {checkpoint.TIED_LM_HEAD}  # the tied head is wte's storage: left out
    assert all(torch.equal(a[k], b[k]) for k in b)
    stamp = converted.stat().st_mtime_ns
    assert checkpoint.to_safetensors(pt) == converted and converted.stat().st_mtime_ns == stamp  # reused
    # A new .pt (another download) makes a new conversion.
    bias = a["clip_project.model.0.bias"].clone()  # `a` is memory-mapped from the file rewritten below
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in a.items()}, pt)
    again = checkpoint.read(checkpoint.to_safetensors(pt)).state
    assert torch.equal(again["clip_project.model.0.bias"], bias + 1)


def test_a_read_only_models_folder_still_loads(
    narrow_heads, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """Converting needs to write beside the .pt; where it cannot (a shared read-only install, a
    full disk), the .pt itself is loaded and the user told why it is slower."""
    path, _, _, _ = narrow_heads
    pt = tmp_path / "model.pt"
    pt.write_bytes(path.read_bytes())

    def read_only(target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(checkpoint, "atomic_write", lambda target, write: read_only(target))
    raw = loading.read_checkpoint(pt, converted=True)
    assert raw.has_lm and not pt.with_suffix(".safetensors").exists()
    assert "could not convert model.pt to safetensors (Permission denied)" in caplog.text


# --------------------------------------------------------------------------- precision and batch size


def test_bf16_precision_puts_gpt2_and_clip_in_bf16_on_the_cpu(tiny_checkpoint: Path, tmp_path: Path):
    """--precision bf16: GPT-2 and CLIP (on the CPU) in bf16, the mapper in fp32, captions still come."""
    from PIL import Image

    photo = tmp_path / "red.png"
    Image.new("RGB", (40, 30), "red").save(photo)
    fast = loading.load_model(str(tiny_checkpoint), device="cpu", precision="bf16")
    assert next(fast.model.gpt.parameters()).dtype == torch.bfloat16
    assert next(fast.clip_model.parameters()).dtype == torch.bfloat16
    assert next(fast.model.clip_project.parameters()).dtype == torch.float32
    [result] = fast.caption(photo, max_length=6)
    assert result.text and result.tokens
    exact = loading.load_model(str(tiny_checkpoint), device="cpu")  # auto: fp32 everywhere
    assert {next(m.parameters()).dtype for m in (exact.model.gpt, exact.clip_model)} == {torch.float32}
    assert "gpt2=bfloat16" in repr(fast) and "gpt2=float32" in repr(exact)


def test_a_precision_the_device_lacks_fails_before_loading(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    from clipcap_cli.errors import UsageError

    read = []
    monkeypatch.setattr(checkpoint, "read", lambda *a, **k: read.append(a))
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        loading.load_model(str(tiny_checkpoint), device="cpu", precision="fp16")
    with pytest.raises(UsageError, match="unknown precision"):
        loading.load_model(str(tiny_checkpoint), device="cpu", precision="fp8")
    assert read == []


def test_stream_picks_the_batch_size_for_the_device(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """No batch size given: the one decoding.default_batch_size measured for the strategy."""
    from PIL import Image

    import clipcap_cli.data.inputs as inputs_module
    from clipcap_cli.decoding.decode import CPU_BATCH_SIZE, DecodingOptions

    photos = []
    for i in range(3):
        photos.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20, 20), (i * 80, 0, 0)).save(photos[-1])
    cap = loading.load_model(str(tiny_checkpoint), device="cpu")
    seen = []
    original = inputs_module.load_batches

    def spy(items, transform, batch_size, *args, **kwargs):
        seen.append(batch_size)
        return original(items, transform, batch_size, *args, **kwargs)

    monkeypatch.setattr(inputs_module, "load_batches", spy)
    list(cap.stream(photos, DecodingOptions(max_length=4)))
    list(cap.stream(photos, DecodingOptions(strategy="beam", beam_size=2, max_length=4)))
    list(cap.stream(photos, DecodingOptions(max_length=4), batch_size=2))
    assert seen == [CPU_BATCH_SIZE["greedy"], CPU_BATCH_SIZE["beam"], 2]
