"""The HTML contact sheet, rendered for real in headless Chromium."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import need_tool
from PIL import Image

from clipcap_cli.cli import html

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220)}


def _chromium() -> str:
    return need_tool(
        "chromium", "chromium-browser", "google-chrome", why="Debian package `chromium`; .ci/run installs it"
    )


def _run_chromium(args: list[str], page: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    base = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ]
    return subprocess.run([*base, *args, page.as_uri()], capture_output=True, text=True, timeout=120)


def _records(tmp_path: Path) -> list[dict]:
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        path = tmp_path / f"{name}.png"
        Image.new("RGB", (120, 90), rgb).save(path)
        records.append(
            {"path": str(path), "caption": f"A {name} square <b>bold</b> & more.", "score": -0.5 - i, "error": None}
        )
    records.append(
        {"path": str(tmp_path / "missing.jpg"), "caption": None, "score": None, "error": "No such file or directory"}
    )
    records.append(
        {
            "path": str(tmp_path / "red.png"),
            "caption": "best",
            "score": -0.1,
            "error": None,
            "captions": ["best", "second"],
            "scores": [-0.1, -0.9],
        }
    )
    return records


def test_sheet_is_self_contained_and_escaped(tmp_path: Path):
    page = html.render(_records(tmp_path), title="Holiday <photos>")
    assert page.count("data:image/jpeg;base64,") == 4  # 3 colours + the repeated red; none for the error
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "Holiday &lt;photos&gt;" in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page  # works offline
    assert "error: No such file or directory" in page
    assert "5 images, 1 errors" in page


@pytest.mark.slow
def test_chromium_shows_every_image_and_caption(tmp_path: Path):
    sheet = tmp_path / "sheet.html"
    sheet.write_text(html.render(_records(tmp_path)), encoding="utf-8")
    dom = _run_chromium(["--dump-dom"], sheet, tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for name in COLOURS:
        assert f"A {name} square" in dom.stdout
    assert "error: No such file or directory" in dom.stdout and "second" in dom.stdout

    shot = tmp_path / "shot.png"
    result = _run_chromium([f"--screenshot={shot}", "--window-size=1280,1200", "--hide-scrollbars"], sheet, tmp_path)
    assert shot.is_file(), result.stderr[-2000:]
    import numpy as np

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    counts = {name: int((np.abs(pixels - np.array(rgb)).max(axis=-1) < 25).sum()) for name, rgb in COLOURS.items()}
    # Every thumbnail is drawn: thousands of pixels of each colour on the screenshot.
    assert all(n > 2000 for n in counts.values()), counts
