"""Fetching a client's ``jwks_uri`` without letting a registration aim the server at its own network (SSRF).

Framework-free. The URL must be https; every address its host resolves to, and the address actually
connected to, must be public (not loopback, private, link-local, multicast, reserved or unspecified).
A development allow-list (``JWKS_FETCH_ALLOW``) lifts both rules for named hosts or networks. Answers are
bounded in time and size and never follow redirects.
"""
from __future__ import annotations

import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

#: Defaults: a JWKS is a few kilobytes; a slow or huge answer is an attack or a mistake.
MAX_JWKS_BYTES = 64 * 1024
TIMEOUT_SECONDS = 3.0


class OutboundRefused(ValueError):
    """The URL may not be fetched (scheme, address, size, status); the message says which rule."""


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_public_address(address: str) -> bool:
    """Whether ``address`` is a globally routable unicast address.

    >>> [is_public_address(a) for a in ("93.184.216.34", "127.0.0.1", "10.1.2.3", "169.254.169.254", "::1",
    ...                                 "::ffff:192.168.0.1", "0.0.0.0", "fd00::1")]
    [True, False, False, False, False, False, False, False]
    """
    ip = _ip(address)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified or ip.is_loopback
                                 or ip.is_link_local or ip.is_private)


@dataclass(frozen=True)
class AllowList:
    """Development exceptions: host names (``localhost``), ``host:port`` pairs, and networks (``127.0.0.0/8``).

    An allowed host may be fetched over http and may resolve to non-public addresses.

    >>> allow = AllowList.parse("127.0.0.1/32, jwks.internal:8443")
    >>> allow.allows("127.0.0.1", 80, "127.0.0.1"), allow.allows("jwks.internal", 443, "10.0.0.5")
    (True, False)
    """

    hosts: frozenset = frozenset()
    networks: tuple = ()

    @classmethod
    def parse(cls, entries) -> "AllowList":
        if isinstance(entries, str):
            entries = entries.split(",")
        hosts, networks = set(), []
        for entry in entries or ():
            entry = str(entry).strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks))

    def __bool__(self) -> bool:
        return bool(self.hosts or self.networks)

    def allows_host(self, host: str) -> bool:
        """Whether ``host`` is named by the list at all (any port), for registration-time checks."""
        host = host.lower().strip("[]")
        if host in self.hosts or any(h.rsplit(":", 1)[0] == host for h in self.hosts if ":" in h):
            return True
        try:
            return any(_ip(host) in net for net in self.networks)
        except ValueError:
            return False

    def allows(self, host: str, port: int, address: str | None = None) -> bool:
        host = host.lower().strip("[]")
        if host in self.hosts or f"{host}:{port}" in self.hosts:
            return True
        candidates = [a for a in (host, address) if a]
        for candidate in candidates:
            try:
                ip = _ip(candidate)
            except ValueError:
                continue
            if any(ip in net for net in self.networks):
                return True
        return False


def _checked(sock: socket.socket, host: str, port: int, allow: AllowList) -> socket.socket:
    # Checked on the socket actually connected, so DNS rebinding between resolve and connect cannot slip by.
    peer = sock.getpeername()[0]
    if not is_public_address(peer) and not allow.allows(host, port, peer):
        sock.close()
        raise OutboundRefused(f"{host} resolved to the non-public address {peer}")
    return sock


def _connection_classes(allow: AllowList):
    class CheckedHTTP(HTTPConnection):
        def _new_conn(self):
            return _checked(super()._new_conn(), self.host, self.port, allow)

    class CheckedHTTPS(HTTPSConnection):
        def _new_conn(self):
            return _checked(super()._new_conn(), self.host, self.port, allow)

    return CheckedHTTP, CheckedHTTPS


def check_url(url: str, allow: AllowList = AllowList()) -> tuple[str, str, int]:
    """Check the scheme and every resolved address of ``url``; return (scheme, host, port).

    Raises
    ------
    OutboundRefused
        Not https (and not allow-listed), no host, unresolvable, or any resolved address not public.
    """
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise OutboundRefused(f"{url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise OutboundRefused(f"{url!r} is not an absolute https URL")
    port = port or (443 if parts.scheme == "https" else 80)
    if parts.scheme != "https" and not allow.allows(host, port):
        raise OutboundRefused(f"{url!r} is not https")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OutboundRefused(f"{host} does not resolve: {exc}") from None
    for *_, sockaddr in infos:
        address = sockaddr[0]
        if not is_public_address(address) and not allow.allows(host, port, address):
            raise OutboundRefused(f"{host} resolves to the non-public address {address}")
    return parts.scheme, host, port


def _pool(url: str, allow: AllowList, timeout: float):
    """A one-connection pool to ``url``'s checked host whose connections re-check every address they
    connect to; with the request path and the Host header value."""
    scheme, host, port = check_url(url, allow)
    http_cls, https_cls = _connection_classes(allow)
    pool_cls = urllib3.HTTPSConnectionPool if scheme == "https" else urllib3.HTTPConnectionPool
    pool = pool_cls(host, port, timeout=urllib3.Timeout(connect=timeout, read=timeout), retries=False, maxsize=1)
    pool.ConnectionCls = https_cls if scheme == "https" else http_cls
    parts = urlsplit(url)
    return pool, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), parts.netloc


def fetch_json(url: str, *, allow: AllowList = AllowList(), timeout: float = TIMEOUT_SECONDS,
               max_bytes: int = MAX_JWKS_BYTES):
    """GET ``url`` under the rules above and parse its JSON body.

    Raises
    ------
    OutboundRefused
        A rule refused the URL or the answer (status, size, not JSON).
    urllib3.exceptions.HTTPError
        The connection failed or timed out.
    """
    pool, path, netloc = _pool(url, allow, timeout)
    try:
        response = pool.urlopen("GET", path, headers={"Accept": "application/json", "Host": netloc},
                                redirect=False, preload_content=False, assert_same_host=False)
        try:
            if response.status != 200:
                raise OutboundRefused(f"{url} answered HTTP {response.status}")
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise OutboundRefused(f"{url} is larger than {max_bytes} bytes")
            # The read timeout bounds each wait; the deadline bounds the whole answer (a server dripping one
            # byte at a time must not hold a request thread for long).
            deadline = time.monotonic() + 2 * timeout
            chunks, size = [], 0
            while size <= max_bytes:
                chunk = response.read(16 * 1024, decode_content=True)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise OutboundRefused(f"{url} took longer than {2 * timeout:.0f} s to answer")
            if size > max_bytes:
                raise OutboundRefused(f"{url} is larger than {max_bytes} bytes")
            body = b"".join(chunks)
        finally:
            response.release_conn()
    finally:
        pool.close()
    try:
        return json.loads(body)
    except ValueError:
        raise OutboundRefused(f"{url} did not answer JSON") from None


def post(url: str, body: bytes, headers: dict, *, allow: AllowList = AllowList(),
         timeout: float = TIMEOUT_SECONDS) -> int:
    """POST ``body`` to ``url`` under the same rules as ``fetch_json`` (no redirects); the HTTP status.

    Used for notifications to subscriber endpoints (FHIR Subscription rest-hook).

    Raises
    ------
    OutboundRefused
        A rule refused the URL or the address connected to.
    urllib3.exceptions.HTTPError
        The connection failed or timed out.
    """
    pool, path, netloc = _pool(url, allow, timeout)
    try:
        response = pool.urlopen("POST", path, body=body, headers={"Host": netloc, **headers},
                                redirect=False, preload_content=False, assert_same_host=False)
        try:
            return response.status
        finally:
            response.release_conn()
    finally:
        pool.close()
