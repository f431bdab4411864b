"""What a load process knows of the native frames it receives: their kinds, counted unparsed.

A load process counts frames with one ``bytes.count`` per frame kind per ``recv``, so a loaded
generator costs little next to the server it measures. Invariant: a count is exact across
``recv`` boundaries, given the tail that ``count_chunk`` returned for the previous chunk. Only
the latency viewers parse, with one regular expression per ``recv``.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Frame kinds, counted per recv. Each pattern has quotes around a colon, which a JSON string
# value can only hold escaped (\"), so it matches the frame's own keys and nothing inside a text.
MESSAGE = b'"type":"message"'
OK = b'"type":"ok"'
JOINED = b'"event":"joined"'
PING = b'"type":"ping"'
ERROR = b'"type":"error"'
PATTERNS = (MESSAGE, OK, JOINED, PING, ERROR)
TAIL = max(len(p) for p in PATTERNS) - 1  # bytes kept of a chunk cut inside a frame
LATENCY_TEXT = re.compile(rb'"text":"lat:(\d+)"')
PONG_FRAME = b'{"type":"pong"}\0'


def count_chunk(buf: bytes | bytearray, n: int,
                tail: bytes) -> tuple[list[int], int, bytes]:
    """Frames of ``buf[:n]`` by kind (in ``PATTERNS`` order), all frames, and the tail to keep.

    ``tail`` is the end of the previous chunk when it ended inside a frame (else empty): the
    kinds cut across the boundary are counted too.
    """
    counts = [buf.count(p, 0, n) for p in PATTERNS]
    frames = buf.count(b"\0", 0, n)
    if tail:
        head = bytes(buf[: min(n, TAIL)])
        for i, p in enumerate(PATTERNS):
            joint = tail[-(len(p) - 1) :] + head[: len(p) - 1]
            counts[i] += joint.count(p)
    if buf[n - 1] == 0:
        tail = b""
    elif n >= TAIL:
        tail = bytes(buf[n - TAIL : n])
    else:
        tail = (tail + bytes(buf[:n]))[-TAIL:]
    return counts, frames, tail


def parse_sample(data: bytes | bytearray, n: int, clean_start: bool) -> dict[str, Any] | None:
    """The first message frame wholly inside ``data[:n]``, parsed: proof that the counted frames
    have the right form. None when there is none; ``clean_start``: ``data`` starts a frame."""
    at = data.find(MESSAGE, 0, n)
    if at < 0:
        return None  # the only one was cut across two chunks
    start = data.rfind(b"\0", 0, at) + 1
    end = data.find(b"\0", at, n)
    if (start == 0 and not clean_start) or end < 0:
        return None  # not wholly inside this chunk; the next one will do
    try:
        sample: dict[str, Any] = json.loads(bytes(data[start:end]))
    except ValueError as error:
        return {"unparsable": str(error)}
    return sample
