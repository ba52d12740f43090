"""What a download needs to know about the hosts it talks to.

Google Drive answers a large file with a "can't scan for viruses" HTML page whose form or link confirms the
download: ``confirmation_target`` finds where it points, and refuses any other HTML page in place of the file.
Hugging Face publishes each LFS file's sha256 and size in the headers of a ``/resolve/`` URL:
``published_checksum`` reads them, so that a download can be checked against them.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests

from clipcap_cli.weights.download_errors import BadContentError

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
HTML_PEEK = 256 << 10  # how much of an HTML page is read to look for a confirmation
# Hosts whose HTML answers may be a "file too large to scan" confirmation page.
DRIVE_HOSTS: frozenset[str] = frozenset({"drive.google.com", "docs.google.com", "drive.usercontent.google.com"})


# --------------------------------------------------------------------------- Hugging Face


def published_checksum(
    sess: requests.Session, url: str, timeouts: tuple[float, float] = (10.0, 10.0)
) -> tuple[str | None, int | None]:
    """The (sha256, size) a Hugging Face ``/resolve/`` URL publishes for an LFS file, or (None, None).

    The hub answers a HEAD on ``.../resolve/REV/FILE`` with a redirect whose ``X-Linked-Etag``
    header is the file's sha256 and ``X-Linked-Size`` its size. Any failure here only means no
    published hash: the download itself decides whether the URL works.
    """
    if "/resolve/" not in urlsplit(url).path:
        return None, None
    try:
        resp = sess.head(
            url,
            allow_redirects=False,
            timeout=timeouts,
            headers={"User-Agent": user_agent(), "Accept-Encoding": "identity"},
        )
    except requests.RequestException:
        return None, None
    with resp:
        etag = resp.headers.get("X-Linked-Etag", "").strip().removeprefix("W/").strip('"').lower()
        linked_size = int_or_none(resp.headers.get("X-Linked-Size"))
    return (etag, linked_size) if SHA256_HEX.match(etag) else (None, None)


# --------------------------------------------------------------------------- Google Drive's HTML pages


class _PageParser(HTMLParser):
    """Collects forms (action + inputs), links and the title of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.links: list[str] = []
        self.title = ""
        self._in_form = False
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
            self._in_form = True
        elif tag == "input" and self._in_form and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def looks_like_html(resp: requests.Response, first: bytes) -> bool:
    ctype = resp.headers.get("Content-Type", "").lower()
    if ctype.startswith(("text/html", "application/xhtml")):
        return True
    # Some servers label error pages application/octet-stream; sniff the start too.
    head = first[:64].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def confirmation_target(sess: requests.Session, resp: requests.Response, url: str, first: bytes) -> str:
    """The URL a Drive confirmation page points at; any other page is refused (BadContentError)."""
    text = first[:HTML_PEEK].decode(resp.encoding or "utf-8", errors="replace")
    if host(resp.url) in DRIVE_HOSTS or host(url) in DRIVE_HOSTS:
        target = _drive_confirm_url(text, resp.url or url, url, sess)
        if target:
            return target
    parser = _PageParser()
    parser.feed(text)
    title = " ".join(parser.title.split())[:80]
    hint = f" ({title!r})" if title else ""
    raise BadContentError(
        f"{host(url)} returned an HTML page instead of the file{hint}; the link may be dead or over its download quota"
    )


def _drive_confirm_url(text: str, page_url: str, orig_url: str, sess: requests.Session) -> str | None:
    """The URL that confirms a Google Drive "can't scan for viruses" page, if any."""
    parser = _PageParser()
    parser.feed(text)
    # drive.usercontent.google.com: <form action=...> with hidden id/confirm/uuid.
    # Its method is GET; a POST form accepts the same fields as a query string.
    for action, fields in parser.forms:
        if "confirm" in fields or "id" in fields:
            return _with_query(urljoin(page_url, action or page_url), fields, replace=True)
    # Older pages: a link carrying confirm=TOKEN (HTMLParser already unescaped &amp;).
    for href in parser.links:
        if "confirm=" in href:
            return urljoin(page_url, href)
    if m := re.search(r"confirm=([0-9A-Za-z_-]+)", text):
        return _with_query(orig_url, {"confirm": m.group(1)})
    # Oldest scheme: the token only in a download_warning cookie.
    for cookie in sess.cookies:
        if cookie.name.startswith("download_warning"):
            return _with_query(orig_url, {"confirm": cookie.value or ""})
    return None


def _with_query(url: str, params: dict[str, str], replace: bool = False) -> str:
    parts = urlsplit(url)
    query = {} if replace else dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


# --------------------------------------------------------------------------- who we are, whom we talk to


def host(url: str) -> str:
    return urlsplit(url).hostname or url


def int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def user_agent() -> str:
    try:
        from clipcap_cli.version import __version__ as version
    except Exception:  # version module missing or broken: still download
        version = "dev"
    return f"clipcap-cli/{version}"
