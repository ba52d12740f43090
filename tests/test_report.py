"""report.html: self-contained, escaped, with the loss chart (or a note without matplotlib), the
samples under their thumbnails newest epoch first; and a real run's report in headless Chromium."""

from __future__ import annotations

import html
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from test_html import _run_chromium
from test_monitor import store_with_images
from test_train import tiny_opts

from clipcap_cli import train
from clipcap_cli.cli.html import thumbnail_data_uri
from clipcap_cli.train import report

VOID = {"meta", "img", "br", "hr", "link", "input"}


class TagChecker(HTMLParser):
    """Every element closed in order (void ones excepted): the page is well formed."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def check(page: str) -> TagChecker:
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    return checker


def external_references(checker: TagChecker, page: str) -> list[str]:
    """Anything the browser would fetch: src/href attributes that are not data: URIs or fragments, CSS url()."""
    found = [
        f"{tag} {name}={value}"
        for tag, attrs in checker.tags
        for name, value in attrs.items()
        if name in ("src", "href", "xlink:href", "srcset") and value and not value.startswith(("data:", "#"))
    ]
    return found + re.findall(r"url\((?![\"']?(?:data:|#))[^)]*\)", page) + re.findall(r"@import", page)


def _data(tmp_path: Path):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "red.png")
    thumbs = {"red.png": thumbnail_data_uri(tmp_path / "red.png", 64), "gone.jpg": None}
    epochs = [
        {
            "epoch": 1,
            "step": 5,
            "split": "val",
            "train_loss": 9.5,
            "val_loss": 9.0,
            "samples": [
                {"image": "red.png", "references": ["a red <square>"], "caption": "old & first"},
                {"image": "gone.jpg", "references": [], "caption": "old & first"},
            ],
            "warnings": ['epoch 1: all 2 sample images got the same caption "old & first": try <lower> --lr'],
        },
        {
            "epoch": 2,
            "step": 10,
            "split": "val",
            "train_loss": 4.25,
            "val_loss": None,
            "samples": [
                {"image": "red.png", "references": ["a red <square>", "R&D"], "caption": "<script>alert(1)</script>"},
                {"image": "gone.jpg", "references": ["x"], "caption": "a picture of <b>nothing</b>"},
            ],
            "warnings": [],
        },
    ]
    info = {"run": "runs/<mine>", "epoch": 2, "epochs": 3, "step": 10, "best_epoch": 1, "best_val_loss": 9.0}
    info["best_file"] = "best.safetensors"
    return info, [(0.5, 10.0), (1.0, 9.5), (2.0, 4.25)], [(1, 9.0)], epochs, thumbs


def test_report_is_self_contained_escaped_and_newest_first(tmp_path):
    info, train_points, val_points, epochs, thumbs = _data(tmp_path)
    page = report.render(info, train_points, val_points, epochs, thumbs)
    checker = check(page)
    assert external_references(checker, page) == []
    assert "<svg" in page and "<path" in page and report.NO_CHARTS not in page  # the chart, inline
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # captions are escaped
    assert "&lt;b&gt;nothing&lt;/b&gt;" in page and "a red &lt;square&gt;" in page and "R&amp;D" in page
    assert "runs/&lt;mine&gt;" in page and "try &lt;lower&gt; --lr" in page
    # Newest epoch first; each epoch's samples with their thumbnail or a placeholder box.
    assert page.index("Epoch 2 ") < page.index("Epoch 1 ")
    imgs = [a for tag, a in checker.tags if tag == "img"]
    assert len(imgs) == 2 and all(a["src"].startswith("data:image/jpeg;base64,") for a in imgs)
    assert page.count('class="noimg"') == 2
    assert "best held-out loss 9.0000 at epoch 1 (best.safetensors)" in page
    assert "held-out loss -" in page  # epoch 2's missing value


def test_report_without_matplotlib_says_how_to_get_charts(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    page = report.render(*_data(tmp_path))
    check(page)
    assert "install clipcap-cli[report] for charts" in page and "<svg" not in page
    assert "&lt;script&gt;" in page  # the rest of the page is all there


def test_chart_svg_has_both_curves():
    svg = report.loss_chart_svg([(0.5, 3.0), (1.0, 2.0)], [(1.0, 2.5)])
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "training loss" in svg and "held-out loss" in svg and "epoch" in svg
    assert report.loss_chart_svg([], []).startswith("<svg")  # no points yet: an empty chart, no crash


@pytest.fixture(scope="module")
def run_report(tmp_path_factory, tiny_clip_dir, tiny_gpt2_dir) -> Path:
    """A real run's report: 20 images (one of them missing on disk), 4 samples, 2 epochs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("report")
        store = store_with_images(folder, tiny_clip_dir, missing=tuple(range(0, 20, 2)))  # even images missing
        opts = tiny_opts(tiny_gpt2_dir, epochs=2, val_fraction=0.3, samples=4, lr=3e-3)
        train.train(opts, store, folder / "run")
    finally:
        torch.set_num_threads(n)
    return folder / "run"


def test_a_run_rewrites_its_report_each_epoch(run_report):
    import json

    page = (run_report / "report.html").read_text(encoding="utf-8")
    checker = check(page)
    assert external_references(checker, page) == []
    lines = [json.loads(x) for x in (run_report / "samples.jsonl").read_text().splitlines()]
    assert "Epoch 2 " in page and "Epoch 1 " in page and "<svg" in page
    samples = lines[-1]["samples"]
    for s in samples:
        assert html.escape(s["caption"]) in page
    present = [s for s in samples if int(Path(s["image"]).stem) % 2]  # odd images exist on disk
    imgs = [a for tag, a in checker.tags if tag == "img"]
    assert len(imgs) == 2 * len(present) and page.count('class="noimg"') == 2 * (len(samples) - len(present))


def page_requests(net_log: Path) -> list[str]:
    """The network requests a file:// page made, from Chromium's net log (its own background
    requests, to update and account services, have another network isolation key)."""
    import json

    events = json.loads(net_log.read_text(encoding="utf-8"))["events"]
    return sorted(
        {
            e["params"]["url"]
            for e in events
            if "initiator" in e.get("params", {})
            and str(e["params"].get("network_isolation_key", "")).startswith("file://")
        }
    )


@pytest.mark.slow
def test_chromium_shows_the_report_without_fetching_anything(run_report, tmp_path):
    import json

    page_file = run_report / "report.html"
    page = page_file.read_text(encoding="utf-8")
    net = tmp_path / "net.json"
    dom = _run_chromium(["--dump-dom", "--virtual-time-budget=2000", f"--log-net-log={net}"], page_file, tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert page_requests(net) == []
    assert "<svg" in dom.stdout and "held-out loss" in dom.stdout
    samples = [json.loads(x) for x in (run_report / "samples.jsonl").read_text().splitlines()][-1]["samples"]
    for s in samples:
        assert html.escape(s["caption"], quote=False) in dom.stdout
    assert dom.stdout.count("<img ") == page.count("<img ") > 0

    # The control: the same page with one remote image (and no policy) is caught fetching it.
    control = tmp_path / "control.html"
    control.write_text(
        re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page).replace(
            "</body>", '<img src="http://example.invalid/remote.png"></body>'
        ),
        encoding="utf-8",
    )
    net2 = tmp_path / "net2.json"
    _run_chromium(["--dump-dom", "--virtual-time-budget=2000", f"--log-net-log={net2}"], control, tmp_path / "p2")
    assert page_requests(net2) == ["http://example.invalid/remote.png"]

    # The report draws its thumbnails (the test's images are coloured).
    shot = tmp_path / "shot.png"
    result = _run_chromium(
        [f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars"], page_file, tmp_path
    )
    assert shot.is_file(), result.stderr[-2000:]
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # Odd images exist: green and yellow ones (the chart's only green is its small "best" star).
    green = int((np.abs(pixels - np.array((30, 170, 40))).max(axis=-1) < 30).sum())
    yellow = int((np.abs(pixels - np.array((240, 200, 20))).max(axis=-1) < 30).sum())
    assert green + yellow > 5000, (green, yellow)
