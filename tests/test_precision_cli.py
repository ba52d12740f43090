"""--precision on the command line: bf16 on a CPU without native bf16 runs fp32 with one warning line,
fast and int8 caption, and the help text says what each choice does."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clipcap_cli import cpu
from clipcap_cli.cli.app import app

runner = CliRunner()


def caption(ckpt, image, *args):
    result = runner.invoke(app, ["caption", "--model", str(ckpt), "--max-length", "6", str(image), *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[0])["caption"], result.stderr


def test_bf16_on_an_avx2_cpu_captions_as_fp32_with_one_warning(monkeypatch, tiny_checkpoint, images):
    monkeypatch.setenv(cpu.ENV, "AVX2")
    exact, quiet = caption(tiny_checkpoint, images["rgb"], "--precision", "fp32")
    text, stderr = caption(tiny_checkpoint, images["rgb"], "--precision", "bf16")
    assert text == exact  # it ran fp32: never emulated bf16
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "this CPU (AVX2) has no native bf16" in warnings[0]
    assert "--precision fast" in warnings[0] and "no native bf16" not in quiet


@pytest.mark.parametrize("precision", ["fast"])  # = int8 here; int8 itself: test_quantize.py
def test_fast_and_int8_caption_on_an_avx2_cpu(monkeypatch, tiny_checkpoint, images, precision):
    monkeypatch.setenv(cpu.ENV, "AVX2")
    text, stderr = caption(tiny_checkpoint, images["rgb"], "--precision", precision, "--device", "cpu")
    assert text and "warning:" not in stderr


def test_help_tells_what_each_precision_does():
    out = runner.invoke(app, ["caption", "--help"], env={"COLUMNS": "300"}).stdout
    assert "fast" in out and "int8" in out and "native bf16" in out
    assert "about 2x faster" not in out
