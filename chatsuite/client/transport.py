"""The client's byte stream to the server: plain TCP, or TLS checked against a trusted authority.

``open_transport`` connects (and, with a context, completes the TLS handshake, verifying the
certificate and the host name); every failure becomes ``ConnectError`` carrying one sentence
for people, never a traceback. A ``Transport`` is then read by exactly one thread (the
receiver) and written by any, safely.

TLS goes over memory buffers (``chatsuite.tls``, shared with the server) because the receiver
blocks in ``recv`` while the main thread sends, and an ``ssl.SSLSocket`` must not be used by two
threads at once.
"""

from __future__ import annotations

import socket
import ssl
import threading

from chatsuite.client.display import sanitize
from chatsuite.tls import TlsSession

RECV_SIZE = 65536

WRONG_HOST_CODES = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
EXPIRED_CODE = 10  # X509_V_ERR_CERT_HAS_EXPIRED
NOT_YET_VALID_CODE = 9  # X509_V_ERR_CERT_NOT_YET_VALID
# Unable to get the issuer (locally), self-signed leaf or chain, unable to verify the leaf.
UNTRUSTED_CODES = {2, 18, 19, 20, 21}

INSECURE_WARNING = ("WARNING: --insecure: the server's identity is NOT checked; anyone on the "
                    "network could read or change this chat.")


class ConnectError(Exception):
    """The connection could not be made; the text is a sentence for people."""


class Transport:
    """A plain TCP stream: ``recv`` for the one reader thread, ``sendall`` for any thread."""

    tls = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()  # one writer at a time: frames never interleave

    def recv(self, size: int = RECV_SIZE) -> bytes:
        """Received bytes; empty at the end of the stream (OSError on a reset)."""
        return self.sock.recv(size)

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def close(self) -> None:
        """Close the socket; a reader blocked in ``recv`` wakes up with the end of the stream."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class TlsTransport(Transport):
    """A TLS stream over a ``TlsSession``: the receiver decrypts while any thread sends.

    Encrypted bytes leave under ``_send_lock``, taken before the session's lock, so records
    go out in the order OpenSSL made them.
    """

    tls = True

    def __init__(self, sock: socket.socket, session: TlsSession) -> None:
        super().__init__(sock)
        self._session = session

    def recv(self, size: int = RECV_SIZE) -> bytes:
        session = self._session
        while not session.closed:
            plaintext = session.decrypt(self.sock.recv(size))
            if session.records_waiting:
                self._flush()  # records OpenSSL made while reading (a key update answer)
            if plaintext:
                return plaintext
        return b""

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(self._session.encrypt(data))

    def _flush(self) -> None:
        with self._send_lock:
            records = self._session.encrypt(b"")
            if records:
                self.sock.sendall(records)

    def close(self) -> None:
        """Say ``close_notify`` (best effort, never waiting long), then close the socket."""
        if self._send_lock.acquire(timeout=1.0):
            try:
                records = self._session.close_notify()
                self.sock.settimeout(1.0)
                self.sock.sendall(records)
            except OSError:
                pass
            finally:
                self._send_lock.release()
        super().close()


def client_context(cafile: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """TLS 1.2 or newer; the certificate and host name checked against ``cafile`` or the system
    store, or (``insecure``) not at all. ``ConnectError`` when ``cafile`` cannot be read."""
    if insecure:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError, ValueError) as error:
            reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or error
            raise ConnectError(f"cannot use the --cafile file {sanitize(cafile)}: "
                               f"{sanitize(reason)}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def describe_tls_failure(error: ssl.SSLError, host: str) -> str:
    """Why a TLS handshake failed, for people: untrusted issuer, wrong host name, expired, ..."""
    if isinstance(error, ssl.SSLCertVerificationError):
        code = error.verify_code
        if code in WRONG_HOST_CODES:
            return (f"the server's certificate is not valid for {sanitize(host)}: it was issued "
                    "for another host name (connect with a name or address the certificate lists)")
        if code == EXPIRED_CODE:
            return "the server's certificate has expired"
        if code == NOT_YET_VALID_CODE:
            return "the server's certificate is not valid yet (is this computer's clock right?)"
        if code in UNTRUSTED_CODES:
            return ("the server's certificate is not trusted: it was issued by an unknown "
                    "authority (give that authority's certificate with --cafile FILE)")
        return f"the server's certificate could not be verified: {sanitize(error.verify_message)}"
    if error.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
        return "the server did not answer in TLS (is it a plain server? try without --tls)"
    return f"the TLS handshake failed: {sanitize(error.reason or error)}"


def _handshake(sock: socket.socket, context: ssl.SSLContext, host: str) -> TlsTransport:
    session = TlsSession(context, server_side=False, server_hostname=host)
    try:
        while not session.handshake():
            records = session.encrypt(b"")
            if records:
                sock.sendall(records)
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionResetError from None
            session.receive(data)
    finally:
        try:
            records = session.encrypt(b"")
            if records:
                sock.sendall(records)  # our Finished, or the alert saying why we stop
        except OSError:
            pass
    return TlsTransport(sock, session)


def open_transport(host: str, port: int, context: ssl.SSLContext | None,
                   timeout: float) -> Transport:
    """Connect to ``host:port`` (TLS when ``context`` is given); ``ConnectError`` says why not."""
    where = f"{sanitize(host)}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise ConnectError(f"could not connect to the server at {where}: "
                           "the connection was refused (is the server running?)") from None
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ConnectError(
            f"could not connect to the server at {where}: {sanitize(reason)}") from None
    if context is None:
        sock.settimeout(None)
        return Transport(sock)
    try:
        transport = _handshake(sock, context, host)
    except ssl.SSLError as error:
        sock.close()
        raise ConnectError(f"could not connect securely to the server at {where}: "
                           f"{describe_tls_failure(error, host)}") from None
    except TimeoutError:
        sock.close()
        raise ConnectError(f"could not connect securely to the server at {where}: "
                           "the server did not finish the TLS handshake in time") from None
    except OSError:
        sock.close()
        raise ConnectError(f"could not connect securely to the server at {where}: the server "
                           "closed the connection during the TLS handshake (is it a plain "
                           "server? try without --tls)") from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return transport
