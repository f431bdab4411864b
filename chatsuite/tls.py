"""TLS over memory buffers, one implementation for the server and the client.

An ``ssl.SSLSocket`` must not be read and written by two threads at once (OpenSSL objects are
not thread-safe), yet both programs read a socket in one thread and write it from another: the
server's reader thread decrypts while its writer thread encrypts, the client's receiver thread
decrypts while its main thread sends. So neither wraps the socket: each keeps a ``TlsSession``,
an ``ssl.SSLObject`` over two ``MemoryBIO`` buffers, and moves the encrypted bytes itself.

Invariant: the ``SSLObject`` and both buffers are touched only under ``lock``, held for short,
non-blocking calls, never while waiting on a socket. Whoever takes records out of the outgoing
buffer must send them in the order it took them, so records leave in the order OpenSSL made them.
"""

from __future__ import annotations

import ssl
import threading

READ_SIZE = 256 * 1024


class TlsSession:
    """One side of a TLS connection, without a socket: ciphertext in, plaintext out and back."""

    def __init__(self, context: ssl.SSLContext, *, server_side: bool,
                 server_hostname: str | None = None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname)
        self.lock = threading.Lock()  # guards _obj and both buffers
        self.established = False
        self.closed = False  # the peer said close_notify or the stream ended

    @property
    def records_waiting(self) -> bool:
        """True when OpenSSL has records to send (a handshake step, a key update answer)."""
        return self._outgoing.pending > 0

    def handshake(self) -> bool:
        """Advance the handshake with what has arrived; True once it is complete.

        Raises ``ssl.SSLError`` (``SSLCertVerificationError`` included) when it fails.
        """
        with self.lock:
            return self._handshake()

    def _handshake(self) -> bool:
        if not self.established:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                return False
            self.established = True
        return True

    def receive(self, data: bytes) -> None:
        """Feed ciphertext from the socket (``b""``: the stream ended)."""
        with self.lock:
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()
            self.closed = True

    def decrypt(self, data: bytes) -> bytes:
        """Feed ciphertext; return the plaintext it completes, handshaking first if needed.

        Raises ``ssl.SSLError`` when the peer breaks TLS.
        """
        with self.lock:
            self._feed(data)
            if not self._handshake():
                return b""
            chunks: list[bytes] = []
            while True:
                try:
                    chunk = self._obj.read(READ_SIZE)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    self.closed = True  # the peer's close_notify
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def encrypt(self, data: bytes) -> bytes:
        """Encrypt ``data``; return every record waiting to be sent, handshake records included."""
        with self.lock:
            if data:
                self._obj.write(data)
            return self._outgoing.read()

    def close_notify(self) -> bytes:
        """Say ``close_notify``; return the records to send (we never wait for the peer's)."""
        with self.lock:
            try:
                self._obj.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: our close_notify is written; we do not wait for theirs
            return self._outgoing.read()
