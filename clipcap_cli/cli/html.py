"""A self-contained HTML contact sheet of captioned images (thumbnails embedded, works offline)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from clipcap_cli.version import __version__

THUMB_SIZE = 320  # longest side, pixels

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; background: #fafafa; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
p.meta { color: #666; margin: 0 0 20px; font-size: 13px; }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid #e3e3e3; border-radius: 8px; overflow: hidden; }
figure img { display: block; width: 100%; height: 220px; object-fit: contain; background: #f0f0f0; }
figure .noimg { height: 220px; display: flex; align-items: center; justify-content: center; background: #fbeaea; color: #a33; }
figcaption { padding: 10px 12px; font-size: 15px; line-height: 1.35; }
.caption { font-weight: 600; }
.score, .path { color: #777; font-size: 12px; word-break: break-all; }
.error { color: #b00020; font-weight: 600; }
ol.alts { margin: 6px 0 0 18px; padding: 0; font-size: 13px; color: #444; }
"""


def thumbnail_data_uri(source: Any, size: int = THUMB_SIZE) -> str | None:
    """A JPEG data URI for a path, bytes or PIL image; None when it cannot be read."""
    from PIL import Image

    from clipcap_cli.data.images import ImageError, open_rgb

    try:
        img = source if isinstance(source, Image.Image) else open_rgb(source)
    except ImageError:
        return None
    img = img.convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render(records: Iterable[Mapping[str, Any]], title: str = "clipcap captions", settings: str = "") -> str:
    """The contact sheet for caption records (``path``, ``caption``, ``score``, ``error``,
    optional ``captions``/``scores``; an optional ``thumbnail`` data URI is used as is)."""
    esc = html.escape
    cards = []
    count = errors = 0
    for rec in records:
        count += 1
        path = str(rec.get("path", ""))
        thumb = rec.get("thumbnail") or (
            None if str(path).startswith(("http://", "https://")) else thumbnail_data_uri(path)
        )
        image = f'<img src="{thumb}" alt="{esc(path)}">' if thumb else '<div class="noimg">no preview</div>'
        if rec.get("error"):
            errors += 1
            body = f'<div class="error">error: {esc(str(rec["error"]))}</div>'
        else:
            score = rec.get("score")
            score_txt = f'<div class="score">score {score:.3f}</div>' if isinstance(score, (int, float)) else ""
            body = f'<div class="caption">{esc(str(rec.get("caption", "")))}</div>{score_txt}'
            alts = rec.get("captions") or []
            if len(alts) > 1:
                scores = rec.get("scores") or [None] * len(alts)
                items = "".join(
                    f"<li>{esc(str(c))}"
                    + (f' <span class="score">({s:.3f})</span>' if isinstance(s, (int, float)) else "")
                    + "</li>"
                    for c, s in zip(alts, scores)
                )
                body += f'<ol class="alts">{items}</ol>'
        cards.append(f'<figure>{image}<figcaption>{body}<div class="path">{esc(path)}</div></figcaption></figure>')
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"{count} images, {errors} errors · {esc(settings)} · clipcap {__version__} · {stamp}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f'<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1><p class="meta">{meta}</p>'
        f"<main>{''.join(cards)}</main></body></html>\n"
    )
