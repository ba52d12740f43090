"""lean.py: the clipcap process keeps triton (the GPU kernel compiler, ~75 MB of RSS) out of a CPU run,
and nothing else: a library user, a CUDA run, CLIPCAP_KEEP_TRITON and a bad --device keep it."""

from __future__ import annotations

import sys

import pytest
import torch

from clipcap_cli import lean


@pytest.fixture
def no_triton_yet(monkeypatch):
    """A process that has not imported triton; whatever this test puts there is undone afterwards."""
    monkeypatch.setitem(sys.modules, "triton", object())
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.delenv(lean.ENV, raising=False)


def test_the_console_process_on_the_cpu_keeps_triton_out(no_triton_yet, monkeypatch):
    assert lean.keep_triton_out("cpu") is False and "triton" not in sys.modules  # a library user: untouched
    monkeypatch.setattr(lean, "_enabled", True)
    assert lean.keep_triton_out("cpu") is True
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    assert lean.keep_triton_out("cpu") is False  # once is enough


@pytest.mark.parametrize("case", ["cuda", "keep", "bad device"])
def test_cuda_the_override_and_a_bad_device_keep_triton(no_triton_yet, monkeypatch, case):
    monkeypatch.setattr(lean, "_enabled", True)
    device = "cpu"
    if case == "cuda":
        monkeypatch.setattr("clipcap_cli.device.pick_device", lambda requested=None: torch.device("cuda"))
        device = None
    elif case == "keep":
        monkeypatch.setenv(lean.ENV, "1")
    else:
        device = "nonsense"
    assert lean.keep_triton_out(device) is False and "triton" not in sys.modules


def test_the_console_enables_it_and_caption_keeps_triton_out_before_loading(no_triton_yet, monkeypatch):
    """The wiring: entry.main turns it on; caption's loader keeps triton out before load_model imports anything."""
    from clipcap_cli import cli, entry
    from clipcap_cli.commands import caption
    from clipcap_cli.decoding import DecodingOptions

    monkeypatch.setattr(lean, "_enabled", False)
    monkeypatch.setattr(sys, "argv", ["clipcap", "info"])
    monkeypatch.setattr(cli, "main", lambda only=None: None)
    entry.main()
    assert lean._enabled is True
    seen = []
    monkeypatch.setattr("clipcap_cli.loading.load_model", lambda **kw: seen.append(sys.modules.get("triton", "absent")))
    caption._load({"name_or_path": "x", "device": "cpu"}, DecodingOptions(), quiet=True)
    assert seen == [None]
