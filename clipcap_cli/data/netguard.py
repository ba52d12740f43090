"""Fetching a URL someone else named, without letting them reach this machine's own network.

A server that fetches image URLs for its clients would otherwise fetch ``http://127.0.0.1:...``,
``http://169.254.169.254/`` (cloud metadata) or a LAN address for them (server-side request forgery).
``public_session`` returns a requests session whose connections are checked *after* they connect:
the socket's peer address must be a global one. Checking the connected socket, not a DNS answer
looked up beforehand, leaves no gap for a name that resolves differently the second time, and
every redirect hop opens its connection through the same check.

Proxies from the environment are not used by such a session (the proxy's own address would be the
one checked, and a proxy would reach private addresses on the client's behalf).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

URL_POLICIES: tuple[str, ...] = ("public", "any", "off")  # clipcap serve --urls


class BlockedAddressError(Exception):
    """The URL's host is not a public address. Not an ``OSError``, so urllib3 does not retry it."""


def is_public(address: str) -> bool:
    """Whether an IP address (v4 or v6, IPv4-mapped included) is globally routable."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone ("fe80::1%eth0") is link-local anyway
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_peer(sock: socket.socket, host: str) -> None:
    """Close ``sock`` and raise ``BlockedAddressError`` unless it is connected to a public address."""
    address = sock.getpeername()[0]
    if not is_public(address):
        sock.close()
        raise BlockedAddressError(f"{host} is a private, loopback or reserved address ({address}): not fetched")


def public_session() -> Any:
    """A ``requests.Session`` that connects only to public addresses (see the module docstring)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class _Checked(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            check_peer(sock, self.host)
            return sock

    class _CheckedTLS(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            check_peer(sock, self.host)
            return sock

    class _Pool(HTTPConnectionPool):
        ConnectionCls = _Checked

    class _TLSPool(HTTPSConnectionPool):
        ConnectionCls = _CheckedTLS

    class _Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}

    session = requests.Session()
    session.trust_env = False  # no proxies from the environment: see the module docstring
    for scheme in ("http://", "https://"):
        session.mount(scheme, _Adapter())
    return session
