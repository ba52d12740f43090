import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from clipcap_cli.cli.app import app
from clipcap_cli.version import __version__

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"clipcap {__version__}"


def test_help_lists_commands_and_exit_codes():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("download", "extract", "train", "caption", "eval"):
        assert name in result.stdout
    assert "3 some inputs failed" in result.stdout


def test_info_json_reports_the_device_this_machine_would_use(monkeypatch):
    import torch

    def info() -> dict:
        result = runner.invoke(app, ["info", "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    here = info()
    assert here["clipcap"] == __version__ and here["cuda_available"] == torch.cuda.is_available()
    best = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert here["device"] == best  # CUDA, then MPS, then the CPU
    # The same rule on the machines we are not on:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (info()["device"], info()["cuda_available"]) == ("cuda", True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (info()["device"], info()["cuda_available"]) == ("cpu", False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert info()["device"] == "mps"


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, clipcap_cli.cli.app; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
def test_top_level_help_is_cached_and_identical(tmp_path):
    """The second `clipcap --help` prints the first one's text without importing typer (the 0.3 s budget)."""
    env = {**__import__("os").environ, "CLIPCAP_HOME": str(tmp_path)}
    cmd = [sys.executable, "-X", "importtime", "-m", "clipcap_cli", "--help"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    assert " typer" in first.stderr and "Commands" in first.stdout
    assert len(list((tmp_path / "cache").glob("help-*.txt"))) == 1
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    assert second.stdout == first.stdout
    assert " typer" not in second.stderr and " rich" not in second.stderr
    # A different width is a different rendering, so it is not served from the same copy.
    narrow = subprocess.run(cmd, capture_output=True, text=True, env={**env, "COLUMNS": "60"}, check=True)
    assert narrow.stdout != first.stdout and " typer" in narrow.stderr


def test_every_command_and_option_is_documented():
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert "Example" in (command.help or ""), f"{name}: no example in its help"
        for param in command.params:
            assert getattr(param, "help", None), f"{name}: {param.name} has no help text"


def test_mistakes_get_suggestions_and_one_line(tmp_path):
    result = runner.invoke(app, ["caption", "--bem", "5", "x.jpg"])
    assert result.exit_code == 2 and "--beam" in result.output
    result = runner.invoke(app, ["caption", "--model", "cocoo", str(tmp_path / "x.jpg")])
    assert result.exit_code == 2 and "did you mean coco?" in result.stderr
    result = runner.invoke(app, ["download", "conceptul"])
    assert result.exit_code == 2 and "did you mean conceptual?" in result.stderr
    assert "Traceback" not in result.output


def test_error_text_with_brackets_is_printed_as_it_is(capsys):
    """An error message is text, not rich markup: gloo's '[/__w/.../pair.cc:561]' once crashed the
    error printer itself (a MarkupError instead of the one line)."""
    import typer

    from clipcap_cli.cli import ui
    from clipcap_cli.errors import ClipCapError

    message = "Connection closed by peer [/__w/pytorch/third_party/gloo/transport/tcp/pair.cc:561]"
    try:
        with ui.cli_errors():
            raise ClipCapError(message)
    except typer.Exit as exc:
        assert exc.exit_code == 1
    assert message in capsys.readouterr().err


def _rendered(column, task) -> str:
    return column.render(task).plain


def test_rate_and_eta_follow_this_runs_items_when_they_arrive_in_bursts():
    """Captions come a batch at a time: 4 images after 20 s, then nothing. rich's own speed spans
    only the updates it sampled (4 advances a microsecond apart: thousands of images/s); the bar
    must show 4 / 20 s. A resumed job's already-done items (``base``) are not this run's work."""
    from clipcap_cli.cli import ui

    now = [100.0]
    progress = ui.item_progress("images", quiet=True)
    progress.get_time = lambda: now[0]
    rate, eta = ui.RateColumn("images"), ui.EtaColumn()

    burst = progress.add_task("captioning", total=8)
    now[0] += 20.0
    for _ in range(4):  # one batch: an advance per caption, as `clipcap caption` does
        progress.advance(burst)
        now[0] += 1e-6
    task = progress.tasks[burst]
    assert task.speed is not None and task.speed > 1000  # rich's windowed figure is the burst's
    assert _rendered(rate, task) == "0.20 images/s"
    assert _rendered(eta, task) == "0:00:20"  # 4 left at 0.2/s

    resumed = progress.add_task("extracting", total=100)
    now[0] += 5.0
    progress.reset(resumed, total=100, completed=90, base=90)  # 90 done by an earlier run
    assert _rendered(rate, progress.tasks[resumed]) == "- images/s"
    now[0] += 10.0
    progress.update(resumed, completed=95)
    assert _rendered(rate, progress.tasks[resumed]) == "0.50 images/s"
    assert _rendered(eta, progress.tasks[resumed]) == "0:00:10"
    progress.update(resumed, completed=100)
    assert _rendered(eta, progress.tasks[resumed]) == "0:00:00"


def test_verbose_belongs_to_one_invocation(tmp_path):
    """--verbose lives in the invocation's context: a later run in the same process is not verbose."""
    from typer.testing import CliRunner

    from clipcap_cli.cli.app import app

    runner = CliRunner()
    args = ["caption", "--model", str(tmp_path / "missing.pt"), "x.jpg"]
    loud = runner.invoke(app, ["-v", *args])
    quiet = runner.invoke(app, args)
    assert loud.exit_code == quiet.exit_code == 2
    assert "Traceback" in loud.stderr and "Traceback" not in quiet.stderr


@pytest.mark.parametrize(
    "args, old, new",
    [
        (["extract", "missing.csv", "--out", "X", "--pretrained", "none"], "--pretrained", "--clip-pretrained"),
        (["extract", "missing.csv", "--out", "X", "--format", "csv"], "--format", "--dataset-format"),
        (["train", "--out", "X", "--num-workers", "1"], "--num-workers", "--workers"),
    ],
)
def test_old_option_spellings_still_work_for_one_release(tmp_path, monkeypatch, args, old, new):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2  # the run itself then stops on the missing data, as with the new spelling
    assert f"{old} is now {new}" in result.stderr


def test_inspect_takes_the_model_options():
    help_text = CliRunner().invoke(app, ["inspect", "--help"], env={"COLUMNS": "200"}).stdout
    for flag in ("--clip", "--clip-pretrained", "--lm", "--normalize-prefix"):
        assert flag in help_text


def test_core_warnings_reach_stderr_when_a_library_raises_the_root_level(capsys):
    """A library that sets the root logger to ERROR (one did, in the suite) must not hide clipcap's warnings."""
    import logging

    from clipcap_cli.cli.ui import show_core_warnings

    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.ERROR)
    try:
        show_core_warnings()
        logging.getLogger("clipcap_cli.some_module").warning("the user should know this")
    finally:
        root.setLevel(saved)
    assert "warning: the user should know this" in capsys.readouterr().err
