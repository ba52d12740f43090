"""Inference precision (precision.py): which names resolve to what on which device, and what
``apply_precision`` changes."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from clipcap_cli import cpu
from clipcap_cli.decoding.precision import PRECISIONS, apply_precision, dtype_of, resolve_precision
from clipcap_cli.errors import UsageError


def test_auto_is_fp32_everywhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert [resolve_precision("auto", d) for d in ("cpu", "cuda", "cuda:1", "mps")] == ["fp32"] * 4


@pytest.mark.parametrize(
    "device, precision, expected",
    [
        ("cpu", "fp32", "fp32"),
        ("cpu", "bf16", "bf16"),
        ("cuda", "bf16", "bf16"),
        ("cuda", "fp16", "fp16"),
    ],
)
def test_asked_precisions(monkeypatch, device, precision, expected):
    monkeypatch.setenv(cpu.ENV, "AVX512+bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision(precision, torch.device(device)) == expected


@pytest.mark.parametrize(
    "device, precision, message",
    [
        ("cpu", "fp16", "fp16 needs a CUDA device"),
        ("mps", "fp16", "fp16 needs a CUDA device"),
        ("cuda", "bf16", "this GPU has no bf16"),
        ("cpu", "int4", "unknown precision 'int4'"),
        ("cuda", "int8", "int8 is for the CPU"),
        ("mps", "int8", "int8 is for the CPU"),
    ],
)
def test_refused_precisions(monkeypatch, device, precision, message):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(UsageError, match=message):
        resolve_precision(precision, device)


def test_dtypes():
    assert [dtype_of(p) for p in PRECISIONS[1:5]] == [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    for unresolved in ("auto", "fast"):
        with pytest.raises(UsageError, match="resolve it first"):
            dtype_of(unresolved)


def test_apply_precision_changes_gpt2_only(tiny_config, monkeypatch):
    monkeypatch.setenv(cpu.ENV, "AVX512+bf16")
    model = build_tiny_model(tiny_config)
    assert apply_precision(model, "auto") == "fp32"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert apply_precision(model, "bf16") == "bf16"
    assert {p.dtype for p in model.gpt.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.clip_project.parameters()} == {torch.float32}
    assert model.gpt.lm_head.weight is model.gpt.transformer.wte.weight  # still tied
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        apply_precision(model, "fp16")


# --------------------------------------------------------------------------- the CPU's capability decides


@pytest.mark.parametrize(
    "capability, cuda_bf16, device, expected",
    [
        ("AVX2", True, "cpu", "int8"),
        ("AVX512", True, "cpu", "int8"),  # AVX512 without its BF16 extension: bf16 is emulated
        ("AVX512+bf16", True, "cpu", "bf16"),
        ("AMX+bf16", True, "cpu", "bf16"),
        ("AVX2", True, "cuda", "bf16"),
        ("AVX2", False, "cuda", "fp16"),
        ("AVX2", True, "mps", "fp32"),
    ],
)
def test_fast_is_the_fastest_good_mode_of_the_hardware(monkeypatch, capability, cuda_bf16, device, expected):
    monkeypatch.setenv(cpu.ENV, capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    assert resolve_precision("fast", device) == expected


def test_bf16_without_native_bf16_runs_fp32_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv(cpu.ENV, "AVX2")
    with caplog.at_level("WARNING", logger="clipcap_cli"):
        assert resolve_precision("bf16", "cpu") == "fp32"
    [record] = caplog.records
    assert "this CPU (AVX2) has no native bf16" in record.getMessage()
    assert "fp32 instead" in record.getMessage() and "--precision fast" in record.getMessage()
    caplog.clear()
    monkeypatch.setenv(cpu.ENV, "AVX512+bf16")
    with caplog.at_level("WARNING", logger="clipcap_cli"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    assert caplog.records == []


def test_load_model_bf16_on_avx2_loads_fp32_and_warns_once(monkeypatch, caplog, tiny_checkpoint):
    from clipcap_cli.loading import load_model

    monkeypatch.setenv(cpu.ENV, "AVX2")
    with caplog.at_level("WARNING", logger="clipcap_cli"):
        captioner = load_model(str(tiny_checkpoint), device="cpu", precision="bf16")
    assert {p.dtype for p in captioner.model.parameters()} == {torch.float32}
    assert {p.dtype for p in captioner.clip_model.parameters()} == {torch.float32}  # CLIP not in bf16 either
    assert sum("no native bf16" in r.getMessage() for r in caplog.records) == 1


def test_training_bf16_without_native_bf16_trains_fp32(monkeypatch, caplog):
    from clipcap_cli.train.loop import _mixed_precision

    monkeypatch.setenv(cpu.ENV, "AVX2")
    with caplog.at_level("WARNING", logger="clipcap_cli"):
        assert _mixed_precision(torch.device("cpu"), "bf16") == (None, False)
    assert len(caplog.records) == 1 and "no native bf16" in caplog.records[0].getMessage()
    monkeypatch.setenv(cpu.ENV, "AMX+bf16")
    assert _mixed_precision(torch.device("cpu"), "bf16") == (torch.bfloat16, False)


def test_training_takes_no_int8_or_fast():
    from clipcap_cli.train import TrainOptions

    for name in ("int8", "fast"):
        with pytest.raises(UsageError, match="unknown precision"):
            TrainOptions(precision=name)


def test_fp32_stays_bit_exact(tiny_checkpoint):
    """--precision fp32 (and auto) build the very model the checkpoint holds: same modules, same
    tensors, and logits identical to a model that never went through the precision step."""
    from clipcap_cli.loading import load_model, load_network

    plain = load_network(str(tiny_checkpoint))
    emb = torch.randn(4, plain.config.prefix_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = plain.gpt(inputs_embeds=plain.embed_prefix(emb)).logits
    for name in ("fp32", "auto"):
        model = load_model(str(tiny_checkpoint), device="cpu", precision=name).model
        assert [type(m) for m in model.modules()] == [type(m) for m in plain.modules()]
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
        with torch.no_grad():
            assert torch.equal(model.gpt(inputs_embeds=model.embed_prefix(emb)).logits, expected)
