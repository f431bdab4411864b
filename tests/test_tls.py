"""TLS on the server (--tls-cert/--tls-key) and the per-address door rule (--max-per-ip)."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from conftest import Peer, wait_until

from chat_server import ChatServer


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """A certificate for localhost and 127.0.0.1, signed by the test CA, and its key."""
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return str(cert_file), str(key_file)


@pytest.fixture
def server_log() -> list[str]:
    """The log lines of the test's TLS server."""
    return []


@pytest.fixture
def tls_server(
    start_server: Callable[..., ChatServer], cert_files: tuple[str, str], server_log: list[str]
) -> ChatServer:
    return start_server(rate=0, tls_cert=cert_files[0], tls_key=cert_files[1],
                        log=server_log.append)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


class TlsPeer(Peer):
    """A native test peer whose socket is wrapped in TLS."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext,
                 hostname: str = "localhost") -> None:
        raw = socket.create_connection(address, timeout=5)
        super().__init__(address, 5.0, sock=context.wrap_socket(raw, server_hostname=hostname))


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def test_native_clients_chat_over_tls(tls_server: ChatServer, ca: trustme.CA) -> None:
    """Two native clients register and exchange a broadcast over TLS."""
    alice = TlsPeer(tls_server.address, client_context(ca))
    bob = TlsPeer(tls_server.address, client_context(ca))
    alice.register("alice")
    bob.register("bob")
    bob.view()
    alice.send({"type": "say", "text": "secret plans", "ref": 1})
    assert alice.expect("ok", ref=1)["delivered"] == 1
    message = bob.expect("message")
    assert (message["from"]["name"], message["text"]) == ("alice", "secret plans")
    alice.close()
    bob.close()


def test_line_client_over_tls(tls_server: ChatServer, ca: trustme.CA, connect) -> None:
    """A seed 002 line client logs in and sends to a native client over TLS."""
    alice = TlsPeer(tls_server.address, client_context(ca))
    alice.register("alice")
    alice.view()
    line_client = client_context(ca).wrap_socket(
        socket.create_connection(tls_server.address, timeout=5), server_hostname="localhost")
    line_client.sendall(b"HELLO-FROM bob\n")
    assert read_line(line_client) == b"HELLO bob\n"
    alice.expect("notice", event="joined")
    line_client.sendall(b"SEND alice over tls\n")
    assert read_line(line_client) == b"SEND-OK\n"
    assert alice.expect("message")["text"] == "over tls"
    line_client.close()
    alice.close()


def test_unknown_issuer_fails_cleanly_on_both_sides(
    tls_server: ChatServer, server_log: list[str]
) -> None:
    """A client that does not trust the server's CA fails verification; the server logs one line."""
    untrusting = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusting.wrap_socket(socket.create_connection(tls_server.address, timeout=5),
                               server_hostname="localhost")
    line = wait_until(lambda: [x for x in server_log if "TLS failed" in x], what="a log line")
    assert len(line) == 1 and "disconnected" in line[0]


def test_wrong_host_name_fails_verification(tls_server: ChatServer, ca: trustme.CA) -> None:
    """A certificate for localhost does not pass for another host name."""
    with pytest.raises(ssl.SSLCertVerificationError) as failure:
        client_context(ca).wrap_socket(socket.create_connection(tls_server.address, timeout=5),
                                       server_hostname="chat.example.org")
    assert "Hostname mismatch" in str(failure.value)


def test_plain_client_on_tls_port_is_closed(
    tls_server: ChatServer, ca: trustme.CA, server_log: list[str]
) -> None:
    """Plain bytes on a TLS port close the connection with one log line; TLS clients still work."""
    plain = socket.create_connection(tls_server.address, timeout=5)
    plain.sendall(b'{"type":"hello","name":"mallory"}\0')
    assert plain.recv(100) == b""
    assert wait_until(lambda: [x for x in server_log if "TLS failed" in x])
    alice = TlsPeer(tls_server.address, client_context(ca))
    assert alice.register("alice")["name"] == "alice"
    alice.close()


def test_tls_client_on_plain_port_fails_cleanly(start_server: Callable[..., ChatServer]) -> None:
    """A TLS handshake sent to a plain port is refused, logged once, and registers nobody."""
    logs: list[str] = []
    server = start_server(rate=0, log=logs.append)
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        ssl.create_default_context().wrap_socket(
            socket.create_connection(server.address, timeout=5), server_hostname="localhost")
    assert wait_until(lambda: [x for x in logs if "TLS handshake on a plain port" in x])
    assert server.room.users() == ()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_tls_versions_are_refused(tls_server: ChatServer, ca: trustme.CA) -> None:
    """A client limited to TLS 1.1 cannot connect: the server speaks TLS 1.2 or newer only."""
    context = client_context(ca)
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        context.wrap_socket(socket.create_connection(tls_server.address, timeout=5),
                            server_hostname="localhost")


def test_tls_handshake_counts_against_hello_timeout(
    start_server: Callable[..., ChatServer], cert_files: tuple[str, str]
) -> None:
    """A connection that never completes its TLS handshake is closed after the hello timeout."""
    server = start_server(rate=0, tls_cert=cert_files[0], tls_key=cert_files[1], hello_timeout=0.3)
    silent = socket.create_connection(server.address, timeout=5)
    assert silent.recv(100) == b""


def test_max_per_ip_refuses_at_accept(start_server: Callable[..., ChatServer], connect) -> None:
    """Past --max-per-ip a connection is closed at once, before it sends anything, and logged."""
    lines: list[str] = []
    server = start_server(rate=0, max_per_ip=2, log=lines.append)
    first, second = connect(server), connect(server)
    first.register("first")
    second.register("second")
    third = connect(server)
    assert third.read_until_closed() == b""  # closed without a word: nothing was spent on it
    refused = f"refused: 127.0.0.1:{third.sock.getsockname()[1]} (more than 2 connections from "
    wait_until(lambda: f"{refused}its address)" in lines, what="the refusal logged")
    line_client = socket.create_connection(server.address, timeout=5)
    assert line_client.recv(100) == b""
    line_client.close()
    first.send({"type": "users"})
    assert [u["name"] for u in first.expect("users")["users"]] == ["first", "second"]
    # A place frees up when a connection from the address ends.
    second.send({"type": "quit"})
    second.expect("bye")
    assert second.closed()
    wait_until(lambda: len(server._connections) == 1, what="the closed connections to be forgotten")
    fifth = connect(server)
    assert fifth.register("fifth")["name"] == "fifth"


def test_json_over_tls_round_trips_unicode(tls_server: ChatServer, ca: trustme.CA) -> None:
    """Raw UTF-8 text and a NUL inside a message survive the TLS layer unchanged."""
    alice = TlsPeer(tls_server.address, client_context(ca))
    alice.register("alice")
    alice.view()
    alice.send({"type": "dm", "to": "alice", "text": "héllo\u0000wörld ✓"})
    assert alice.expect("message")["text"] == "héllo\u0000wörld ✓"
    assert json.dumps(alice.expect("ok")) == '{"type": "ok", "delivered": 1, "queued": 0}'
