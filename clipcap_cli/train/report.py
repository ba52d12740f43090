"""``report.html``: a training run on one self-contained page (data in, HTML out; no file access).

The loss curves are an inline SVG drawn with matplotlib (the ``report`` extra: ``pip install
clipcap-cli[report]``; without it the page says so in the chart's place), and each epoch's sample
captions sit under their thumbnails (JPEG data URIs), newest epoch first, with the reference
captions and that epoch's warnings. No URL is fetched: a Content-Security-Policy forbids it.
All text is escaped: captions and paths are user data.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from clipcap_cli.version import __version__

NO_CHARTS = "install clipcap-cli[report] for charts"
# Everything the page shows is inline: no script, no fetch; images only as data: URIs.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; background: #fafafa; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; }
p.meta { color: #666; margin: 0 0 16px; font-size: 13px; }
.chart svg { max-width: 100%; height: auto; background: #fff; border: 1px solid #e3e3e3; border-radius: 8px; }
.nochart { padding: 12px; background: #fff; border: 1px dashed #bbb; border-radius: 8px; color: #555; }
.warning { color: #8a5300; background: #fff4e0; border-left: 4px solid #f0a020; padding: 6px 10px; margin: 6px 0; }
.samples { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 12px; }
figure { margin: 0; background: #fff; border: 1px solid #e3e3e3; border-radius: 8px; overflow: hidden; }
figure img { display: block; width: 100%; height: 150px; object-fit: contain; background: #f0f0f0; }
figure .noimg { height: 150px; display: flex; align-items: center; justify-content: center; background: #eee;
  color: #888; font-size: 13px; }
figcaption { padding: 8px 10px; font-size: 14px; line-height: 1.35; }
.generated { font-weight: 600; }
ul.refs { margin: 4px 0 0 16px; padding: 0; color: #555; font-size: 12px; }
.path { color: #888; font-size: 11px; word-break: break-all; }
"""


def loss_chart_svg(train: Sequence[tuple[float, float]], val: Sequence[tuple[float, float]]) -> str | None:
    """The loss curves (x: epoch) as an ``<svg>`` element; None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        return None
    fig = Figure(figsize=(8, 3.6), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot([x for x, _ in train], [y for _, y in train], color="#1f77b4", linewidth=1.5, label="training loss")
    if val:
        ax.plot(
            [x for x, _ in val], [y for _, y in val], color="#d62728", marker="o", linewidth=1.5, label="held-out loss"
        )
        best = min(val, key=lambda p: p[1])
        ax.plot([best[0]], [best[1]], marker="*", markersize=14, color="#2ca02c", linestyle="none", label="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if train or val:
        ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg") :]  # drop the XML prolog, DOCTYPE and comment: inline in HTML


def _figure(sample: Mapping[str, Any], thumbnail: str | None) -> str:
    esc = html.escape
    image = str(sample.get("image", ""))
    picture = f'<img src="{thumbnail}" alt="{esc(image)}">' if thumbnail else '<div class="noimg">image not found</div>'
    refs = "".join(f"<li>{esc(str(r))}</li>" for r in sample.get("references") or [])
    return (
        f'<figure>{picture}<figcaption><div class="generated">{esc(str(sample.get("caption", "")))}</div>'
        + (f'<ul class="refs">{refs}</ul>' if refs else "")
        + f'<div class="path">{esc(image)}</div></figcaption></figure>'
    )


def _number(x: Any, fmt: str = ".4f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "-"


def render(
    info: Mapping[str, Any],
    train: Sequence[tuple[float, float]],
    val: Sequence[tuple[float, float]],
    epochs: Sequence[Mapping[str, Any]],
    thumbnails: Mapping[str, str | None],
) -> str:
    """The report page.

    Args:
        info: the run: ``run`` (its folder), ``epoch``/``epochs``, ``step``, ``best_epoch`` (0 = none),
            ``best_val_loss``, ``best_file``, ``stopped_early``.
        train, val: (epoch, loss) points: metrics.jsonl's "train" and "val" lines.
        epochs: samples.jsonl's lines (``epoch``, ``step``, ``split``, ``train_loss``, ``val_loss``,
            ``samples``: [{image, references, caption}], ``warnings``), in any order.
        thumbnails: image -> JPEG data URI, or None for an image that could not be read.
    """
    esc = html.escape
    run = str(info.get("run", ""))
    title = f"clipcap training: {run}"
    meta = [f"epoch {info.get('epoch', 0)}/{info.get('epochs', '?')}", f"step {info.get('step', 0)}"]
    if info.get("best_epoch"):
        meta.append(
            f"best held-out loss {_number(info.get('best_val_loss'))} at epoch {info['best_epoch']}"
            + (f" ({info['best_file']})" if info.get("best_file") else "")
        )
    if info.get("stopped_early"):
        meta.append("stopped early (--early-stop)")
    meta.append(f"clipcap {__version__} · {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")

    svg = loss_chart_svg(train, val)
    chart = f'<div class="chart">{svg}</div>' if svg else f'<p class="nochart">{esc(NO_CHARTS)}</p>'

    sections = []
    for record in sorted(epochs, key=lambda r: -int(r.get("epoch", 0))):
        warnings = "".join(f'<p class="warning">{esc(str(w))}</p>' for w in record.get("warnings") or [])
        where = "held-out images" if record.get("split", "val") == "val" else "training images (no held-out split)"
        head = (
            f"Epoch {int(record.get('epoch', 0))} · step {record.get('step', '?')} · training loss "
            f"{_number(record.get('train_loss'))} · held-out loss {_number(record.get('val_loss'))} · {where}"
        )
        figures = "".join(_figure(s, thumbnails.get(str(s.get("image", "")))) for s in record.get("samples") or [])
        sections.append(f'<section><h2>{esc(head)}</h2>{warnings}<div class="samples">{figures}</div></section>')
    if not sections:
        sections.append('<p class="meta">no samples (clipcap train --samples 0)</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>"
        f'<p class="meta">{esc(" · ".join(meta))}</p>{chart}{"".join(sections)}</body></html>\n'
    )
