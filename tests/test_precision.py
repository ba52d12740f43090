"""Inference precision (precision.py): which names resolve to what on which device, and what
``apply_precision`` changes."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model

from clipcap_cli.errors import UsageError
from clipcap_cli.precision import PRECISIONS, apply_precision, dtype_of, resolve_precision


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
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision(precision, torch.device(device)) == expected


@pytest.mark.parametrize(
    "device, precision, message",
    [
        ("cpu", "fp16", "fp16 needs a CUDA device"),
        ("mps", "fp16", "fp16 needs a CUDA device"),
        ("cuda", "bf16", "this GPU has no bf16"),
        ("cpu", "int8", "unknown precision 'int8'"),
    ],
)
def test_refused_precisions(monkeypatch, device, precision, message):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(UsageError, match=message):
        resolve_precision(precision, device)


def test_dtypes():
    assert [dtype_of(p) for p in PRECISIONS[1:]] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(UsageError, match="resolve it first"):
        dtype_of("auto")


def test_apply_precision_changes_gpt2_only(tiny_config):
    model = build_tiny_model(tiny_config)
    assert apply_precision(model, "auto") == "fp32"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert apply_precision(model, "bf16") == "bf16"
    assert {p.dtype for p in model.gpt.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.clip_project.parameters()} == {torch.float32}
    assert model.gpt.lm_head.weight is model.gpt.transformer.wte.weight  # still tied
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        apply_precision(model, "fp16")
