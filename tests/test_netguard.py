"""Fetching URLs that others name: only public addresses, redirects included (``netguard``), as
``clipcap serve`` does by default, and the server's --urls switch."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from clipcap_cli.data import netguard
from clipcap_cli.data.inputs import InputError, fetch_url

JPEG = b"\xff\xd8\xff\xe0" + b"0" * 64  # the body only has to arrive: fetch_url does not decode


@contextmanager
def image_server(host: str, redirect_to: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on ``host`` that serves /x.jpg (or redirects it); yields its base URL and the paths it saw."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            if redirect_to:
                self.send_response(302)
                self.send_header("Location", redirect_to)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPCAP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:8.8.8.8", True),
        ("224.0.0.1", False),
    ],
)
def test_which_addresses_are_public(address: str, public: bool):
    assert netguard.is_public(address) is public


def test_a_loopback_url_is_refused_before_any_request_is_sent(online):
    with image_server("127.0.0.1") as (base, seen):
        with pytest.raises(InputError, match=r"private, loopback or reserved address \(127\.0\.0\.1\)"):
            fetch_url(f"{base}/x.jpg", public_only=True)
        assert seen == []  # connected, checked, closed: no HTTP request reached the server
        assert fetch_url(f"{base}/x.jpg") == JPEG  # the control: without the guard it is fetched
        assert seen == ["/x.jpg"]


def test_a_redirect_to_a_private_address_is_refused(online, monkeypatch: pytest.MonkeyPatch):
    """127.0.0.1 plays a public host here; it redirects to 127.0.0.2, which stays private."""
    monkeypatch.setattr(netguard, "is_public", lambda address: address == "127.0.0.1")
    with image_server("127.0.0.2") as (inner, inner_seen):
        with image_server("127.0.0.1", redirect_to=f"{inner}/x.jpg") as (outer, outer_seen):
            with pytest.raises(InputError, match=r"127\.0\.0\.2 is a private"):
                fetch_url(f"{outer}/start.jpg", public_only=True)
            assert outer_seen == ["/start.jpg"] and inner_seen == []
            assert fetch_url(f"{outer}/start.jpg") == JPEG  # the control: the redirect itself works
            assert inner_seen == ["/x.jpg"]


def test_proxies_from_the_environment_are_not_used_by_the_guarded_session(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HTTP_PROXY", "http://10.0.0.1:3128")
    assert netguard.public_session().trust_env is False


def test_the_server_refuses_urls_by_policy(online):
    pytest.importorskip("fastapi")
    from clipcap_cli.serve import ServeOptions
    from clipcap_cli.serve.protocol import RequestError, fetch_image_bytes

    with image_server("127.0.0.1") as (base, seen):
        url = f"{base}/x.jpg"
        with pytest.raises(RequestError, match="this server does not fetch URLs"):
            fetch_image_bytes(url, ServeOptions(urls="off"), 10.0)
        with pytest.raises(RequestError, match="loopback"):
            fetch_image_bytes(url, ServeOptions(), 10.0)  # the default: public addresses only
        assert seen == []
        assert fetch_image_bytes(url, ServeOptions(urls="any"), 10.0) == JPEG
    with pytest.raises(Exception, match="urls must be one of public, any, off"):
        ServeOptions(urls="everything").check()


def test_serve_names_the_flag_for_a_bad_policy():
    pytest.importorskip("fastapi")
    from typer.testing import CliRunner

    from clipcap_cli.cli.app import app

    result = CliRunner().invoke(app, ["serve", "--urls", "everything"])
    assert result.exit_code == 2
    assert "--urls must be one of public, any, off" in result.stderr
