"""MLLP (HL7 v2 Minimal Lower Layer Protocol) over TCP: <VT> message <FS><CR>, one ACK per message.

A thread per connection; a message is acknowledged only after its transaction has committed, so an
ACK the sender holds is a message the store holds. Peers outside ``allow`` are refused at connect
time (default: loopback only), because MLLP itself carries no credentials.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
from typing import Callable, Iterable

START, END = b"\x0b", b"\x1c\x0d"
MAX_MESSAGE_BYTES = 1 << 20  # a lab result message is kilobytes; anything larger is refused

log = logging.getLogger(__name__)


def frame(message: str | bytes) -> bytes:
    """One MLLP frame."""
    data = message.encode("utf-8") if isinstance(message, str) else message
    return START + data + END


class FrameReader:
    """Splits a byte stream into MLLP message payloads (bytes before <VT> are dropped, as MLLP says)."""

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self.buffer = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        out = []
        while True:
            start = self.buffer.find(START)
            if start < 0:
                self.buffer.clear()
                return out
            end = self.buffer.find(END, start + 1)
            if end < 0:
                if start:
                    del self.buffer[:start]
                if len(self.buffer) > self.limit:
                    raise ValueError(f"MLLP frame longer than {self.limit} bytes")
                return out
            out.append(bytes(self.buffer[start + 1:end]))
            del self.buffer[:end + len(END)]


def parse_networks(values: Iterable[str]) -> list:
    """``--allow`` values (addresses or CIDR blocks) as networks."""
    return [ipaddress.ip_network(v, strict=False) for v in values]


LOOPBACK = ("127.0.0.0/8", "::1/128")


class MllpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A TCP server answering each MLLP frame with ``handler(payload) -> ack text``.

    Parameters
    ----------
    address : (host, port)
        Port 0 picks a free port (``server_address`` tells which).
    handler : callable
        ``bytes -> str``; must not raise (``Hl7Ingest.handle``).
    handler_many : callable, optional
        ``list of bytes -> list of str`` for frames read together (``Hl7Ingest.handle_many``).
    on_connection : callable, optional
        Called with +1 when a sender connects and -1 when it leaves (``Hl7Ingest.connection``).
    allow : iterable of str
        Networks whose peers may connect (default loopback only).
    reuse_port : bool
        SO_REUSEPORT, so worker processes share the port and the kernel spreads connections.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: Callable[[bytes], str],
                 allow: Iterable[str] = LOOPBACK, reuse_port: bool = False,
                 handler_many: Callable[[list[bytes]], list[str]] | None = None,
                 on_connection: Callable[[int], None] | None = None) -> None:
        self.handle_message = handler
        self.handle_messages = handler_many
        self.on_connection = on_connection
        self.allow_reuse_port = reuse_port  # several worker processes share the port
        self.allowed = parse_networks(allow)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Connection)

    def verify_request(self, request, client_address) -> bool:
        peer = ipaddress.ip_address(client_address[0])
        if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped:
            peer = peer.ipv4_mapped
        ok = any(peer in net for net in self.allowed)
        if not ok:
            log.warning("MLLP connection from %s refused (not in --allow)", client_address[0])
        return ok

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests, embedding); ``shutdown()`` stops it."""
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, name="mllp", daemon=True)
        thread.start()
        return thread


class _Connection(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        hook = self.server.on_connection
        if hook is not None:
            hook(1)
        try:
            self._serve()
        finally:
            if hook is not None:
                hook(-1)

    def _serve(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = FrameReader()
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                payloads = reader.feed(data)
            except ValueError as exc:
                log.warning("MLLP connection from %s closed: %s", self.client_address[0], exc)
                return
            if not payloads:
                continue
            # frames that arrived together (a pipelining sender) are handled as one group, so they
            # can share a commit; the ACKs go back in order, each only after its own message is stored
            many = self.server.handle_messages
            acks = many(payloads) if many else [self.server.handle_message(p) for p in payloads]
            try:
                sock.sendall(b"".join(frame(a) for a in acks))
            except OSError:
                return


class MllpClient:
    """A blocking MLLP sender (tests, benches, a command-line sender): ``send`` returns the ACK text."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader()
        self.pending: list[bytes] = []

    def send(self, message: str | bytes) -> str:
        self.sock.sendall(frame(message))
        return self.receive()

    def receive(self) -> str:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the listener closed the connection")
            self.pending.extend(self.reader.feed(data))
        return self.pending.pop(0).decode("utf-8")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "MllpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["FrameReader", "LOOPBACK", "MllpClient", "MllpServer", "frame", "parse_networks"]
