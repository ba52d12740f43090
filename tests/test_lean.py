"""lean.py: the clipcap process keeps triton (the GPU kernel compiler, ~75 MB of RSS) out of a CPU run,
and nothing else: a library user, a CUDA run, CLIPCAP_KEEP_TRITON and a bad --device keep it."""

from __future__ import annotations

import sys

import pytest

from clipcap_cli.cli import lean


@pytest.fixture
def no_triton_yet(monkeypatch):
    """A process that has not imported triton; what a test puts in sys.modules or sys.meta_path is undone."""
    monkeypatch.setitem(sys.modules, "triton", object())
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delenv(lean.ENV, raising=False)


@pytest.mark.parametrize(
    "argv, device",
    [
        (["caption", "a.jpg"], None),
        (["caption", "--device", "cpu", "a.jpg"], "cpu"),
        (["eval", "--device=cuda:1"], "cuda:1"),
    ],
)
def test_the_device_is_read_from_the_command_line(argv, device):
    assert lean.requested_device(argv) == device


def test_on_the_cpu_the_first_import_of_triton_is_refused(no_triton_yet):
    gate = lean.enable(["caption", "--device", "cpu", "a.jpg"])
    assert sys.meta_path[0] is gate
    assert gate.find_spec("json") is None and gate in sys.meta_path  # anything else: not its business
    with pytest.raises(ImportError, match="CLIPCAP_KEEP_TRITON"):
        import triton  # noqa: F401
    assert gate not in sys.meta_path and sys.modules["triton"] is None  # decided once; later imports fail at once
    assert lean.enable(["caption"]) is None  # triton is settled: nothing to install


@pytest.mark.parametrize("case", ["cuda", "cuda named", "keep", "bad device"])
def test_cuda_the_override_and_a_bad_device_keep_triton(no_triton_yet, monkeypatch, case):
    device = "cpu"
    if case == "cuda":
        monkeypatch.setattr(lean, "gpu_possible", lambda: True)
        device = None
    elif case == "cuda named":
        device = "cuda:0"
    elif case == "keep":
        monkeypatch.setenv(lean.ENV, "1")
    else:
        device = "nonsense"
    gate = lean.TritonGate(device)
    sys.meta_path.insert(0, gate)
    assert gate.find_spec("triton") is None  # the next finders import it as usual
    assert gate not in sys.meta_path and "triton" not in sys.modules


def test_only_the_console_entry_point_installs_it(no_triton_yet, monkeypatch):
    from clipcap_cli.cli import app as cli
    from clipcap_cli.cli import entry

    assert not any(isinstance(f, lean.TritonGate) for f in sys.meta_path)  # importing clipcap_cli: untouched
    monkeypatch.setattr(sys, "argv", ["clipcap", "info"])
    monkeypatch.setattr(cli, "main", lambda only=None: None)
    entry.main()
    assert isinstance(sys.meta_path[0], lean.TritonGate) and sys.meta_path[0].device is None


@pytest.mark.parametrize(
    ("files", "visible", "possible"),
    [(["/dev/nvidiactl"], None, True), ([], None, False), (["/dev/kfd"], None, True), (["/dev/nvidiactl"], "", False)],
)
def test_a_gpu_is_possible_only_with_a_driver_and_visible_devices(monkeypatch, files, visible, possible):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(lean.os.path, "exists", lambda p: p in files)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert lean.gpu_possible() is possible
    assert lean.keeps_triton_out(None) is (not possible)


def test_the_gate_decides_while_torch_is_being_imported():
    """The real order: the gate first, then ``import torch``, which asks for triton while it is half imported."""
    import subprocess

    code = (
        "import sys; from clipcap_cli.cli import lean; lean.enable(['extract', 'x', '--device', 'cpu']); "
        "import clipcap_cli.device, torch; print(sys.modules.get('triton', 'absent'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() in ("None", "absent")  # refused (or never asked for): not imported
