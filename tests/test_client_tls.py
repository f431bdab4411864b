"""TLS on the client (issue 6): ``--tls``, ``--cafile``, ``--insecure``, every failure a sentence.

Certificates come from ``trustme`` (a throwaway authority per module); the server is our own with
``tls_cert``/``tls_key``. The client runs as the real program in a pseudo-terminal (pexpect).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pexpect
import pytest
import trustme
from client_helpers import (
    TIME,
    ClientPrograms,
    choose_typing,
    command,
    ended,
    output,
)
from conftest import Peer

WARNING = ("WARNING: --insecure: the server's identity is NOT checked; anyone on the network "
           "could read or change this chat.")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A throwaway certificate authority."""
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    """The authority's certificate as a PEM file, for --cafile."""
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def write_cert(cert: trustme.LeafCert, folder: Path) -> dict[str, str]:
    """Write a certificate chain and its key; the server options that use them."""
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return {"tls_cert": str(cert_file), "tls_key": str(key_file)}


@pytest.fixture
def tls_server(start_server: Callable[..., Any], ca: trustme.CA,
               tmp_path: Path) -> Callable[..., Any]:
    """A factory: our server with TLS, its certificate for the given identities (and options)."""

    def start(*identities: str, **cert_options: Any) -> Any:
        cert = ca.issue_cert(*(identities or ("localhost", "127.0.0.1")), **cert_options)
        return start_server(rate=0, **write_cert(cert, tmp_path))

    return start


class TlsPeer(Peer):
    """A native test peer over TLS, trusting the test authority."""

    def __init__(self, address: tuple[str, int], ca: trustme.CA) -> None:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        raw = socket.create_connection(address, timeout=5)
        super().__init__(address, 5.0, sock=context.wrap_socket(raw, server_hostname="localhost"))


@pytest.fixture
def tls_peers(ca: trustme.CA) -> Iterator[Callable[..., TlsPeer]]:
    """A factory of TLS peers, closed after the test."""
    peers: list[TlsPeer] = []

    def make(server: Any) -> TlsPeer:
        peer = TlsPeer(server.address, ca)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., pexpect.spawn]]:
    """Start ``chat_client.py`` on a port in a pseudo-terminal; every child is killed after."""
    programs = ClientPrograms(tmp_path / "history")

    def start(port: int, *args: str, host: str = "127.0.0.1") -> pexpect.spawn:
        return programs.start(*args, "--host", host, "--port", str(port), "--no-color")

    yield start
    programs.close()


def failed(child: pexpect.spawn, sentence: str) -> None:
    """The child prints ``sentence`` on a line of its own and exits 1, without a traceback."""
    child.expect_exact(sentence + "\r\n")
    assert ended(child) == 1
    assert "Traceback" not in output(child)


def typing(child: pexpect.spawn, welcome: str) -> None:
    """Wait for the TLS connection and ``welcome``, then choose mode 1."""
    child.expect_exact("you are now connected to the server over TLS\r\n")
    child.expect(welcome)
    choose_typing(child)


# --------------------------------------------------------------------------------------------
# Working connections.


def test_native_client_chats_over_tls(
        spawn: Callable[..., pexpect.spawn], tls_server: Callable[..., Any],
        tls_peers: Callable[..., TlsPeer], ca_file: str) -> None:
    """With --tls --cafile the client verifies the server, registers, sends and receives."""
    server = tls_server()
    bob = tls_peers(server)
    bob.register("bob")
    bob.view()
    child = spawn(server.address[1], "alice", "--tls", "--cafile", ca_file)
    typing(child, r"welcome alice, your id is \d+ \(2 online\)")
    assert command(child, '/dm bob "secret plans"') == "message sent (delivered to 1, held for 0)\n"
    assert bob.wait_for("message")["text"] == "secret plans"
    bob.send({"type": "dm", "to": "alice", "text": "got them", "ref": 1})
    bob.wait_for("ok", ref=1)
    child.sendline("#view")
    child.expect(f"{TIME} \\[direct\\] bob \\(id \\d+\\): got them\r\n")
    child.send("q")
    child.expect_exact("bye\r\n")
    assert ended(child) == 0
    assert bob.wait_for("notice", event="left")["text"] == "alice is quitting."
    assert WARNING not in output(child)


def test_cafile_alone_implies_tls(
        spawn: Callable[..., pexpect.spawn], tls_server: Callable[..., Any], ca_file: str) -> None:
    """--cafile without --tls still connects with TLS (it means nothing otherwise)."""
    server = tls_server()
    child = spawn(server.address[1], "alice", "--cafile", ca_file)
    typing(child, r"welcome alice, your id is \d+ \(1 online\)")


def test_line_protocol_over_tls(
        spawn: Callable[..., pexpect.spawn], tls_server: Callable[..., Any],
        tls_peers: Callable[..., TlsPeer], ca_file: str) -> None:
    """--protocol line works over TLS: it lists and sends to a native client."""
    server = tls_server()
    bob = tls_peers(server)
    bob.register("bob")
    bob.view()
    child = spawn(server.address[1], "alice", "--protocol", "line", "--tls", "--cafile", ca_file)
    typing(child, "welcome alice\r\n")
    assert command(child, "/users") == "users (2):\n  bob\n  alice (you)\n"
    assert command(child, "@bob over tls") == "message sent\n"
    assert bob.wait_for("message")["text"] == "over tls"


def test_insecure_connects_to_an_untrusted_server_with_a_loud_warning(
        spawn: Callable[..., pexpect.spawn], tls_server: Callable[..., Any]) -> None:
    """--insecure skips verification (untrusted issuer, other host name) and says so first."""
    server = tls_server("chat.example.org")
    child = spawn(server.address[1], "alice", "--insecure")
    child.expect_exact(WARNING + "\r\n")
    typing(child, r"welcome alice, your id is \d+ \(1 online\)")
    assert output(child).index(WARNING) < output(child).index("you are now connected")


# --------------------------------------------------------------------------------------------
# Failures: one sentence naming the cause, exit 1.


def test_unknown_issuer_is_refused(
        spawn: Callable[..., pexpect.spawn], tls_server: Callable[..., Any]) -> None:
    """Without --cafile the test authority is unknown: 'not trusted', exit 1."""
    server = tls_server()
    port = server.address[1]
    failed(spawn(port, "alice", "--tls"),
           f"could not connect securely to the server at 127.0.0.1:{port}: the server's "
           "certificate is not trusted: it was issued by an unknown authority (give that "
           "authority's certificate with --cafile FILE)")


@pytest.mark.parametrize("identity, host", [("localhost", "127.0.0.1"),
                                            ("chat.example.org", "localhost")],
                         ids=["ip-address", "host-name"])
def test_wrong_host_name_is_refused(
        spawn: Callable[..., pexpect.spawn], tls_server: Callable[..., Any], ca_file: str,
        identity: str, host: str) -> None:
    """A trusted certificate for another name or address: 'not valid for HOST', exit 1."""
    server = tls_server(identity)
    port = server.address[1]
    failed(spawn(port, "alice", "--tls", "--cafile", ca_file, host=host),
           f"could not connect securely to the server at {host}:{port}: the server's "
           f"certificate is not valid for {host}: it was issued for another host name (connect "
           "with a name or address the certificate lists)")


def test_expired_certificate_is_refused(
        spawn: Callable[..., pexpect.spawn], tls_server: Callable[..., Any], ca_file: str) -> None:
    """A trusted certificate whose validity ended yesterday: 'has expired', exit 1."""
    now = datetime.now(UTC)
    server = tls_server("localhost", "127.0.0.1", not_before=now - timedelta(days=30),
                        not_after=now - timedelta(days=1))
    port = server.address[1]
    failed(spawn(port, "alice", "--tls", "--cafile", ca_file),
           f"could not connect securely to the server at 127.0.0.1:{port}: "
           "the server's certificate has expired")


def test_tls_client_to_a_plain_port(
        spawn: Callable[..., pexpect.spawn], start_server: Callable[..., Any],
        ca_file: str) -> None:
    """--tls against a plain server: the handshake is cut off, and the sentence says try without."""
    server = start_server(rate=0)
    port = server.address[1]
    failed(spawn(port, "alice", "--tls", "--cafile", ca_file),
           f"could not connect securely to the server at 127.0.0.1:{port}: the server closed the "
           "connection during the TLS handshake (is it a plain server? try without --tls)")


@pytest.mark.parametrize("protocol", ["native", "line"])
def test_plain_client_to_a_tls_port(
        spawn: Callable[..., pexpect.spawn], tls_server: Callable[..., Any], protocol: str) -> None:
    """A plain client against a TLS server is told the server closed on it and to add --tls."""
    server = tls_server()
    child = spawn(server.address[1], "alice", "--protocol", protocol)
    child.expect_exact("you are now connected to the server\r\n")
    failed(child, "the server closed the connection without answering "
                  "(if the server uses TLS, add --tls)")


def test_unreadable_cafile_is_a_sentence(
        spawn: Callable[..., pexpect.spawn], tls_server: Callable[..., Any],
        tmp_path: Path) -> None:
    """A --cafile that does not exist is named in one sentence; exit 1."""
    server = tls_server()
    missing = tmp_path / "nope.pem"
    failed(spawn(server.address[1], "alice", "--cafile", str(missing)),
           f"cannot use the --cafile file {missing}: No such file or directory")
