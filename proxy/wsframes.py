"""RFC 6455 framing read in passing: where messages end, where frames end.

Tollgate relays a WebSocket as raw bytes (proxy.tunnel) and never re-frames
it; to count the messages a client sends it reads only frame headers, and
skips payloads by arithmetic (no copy). Chunks may split a header anywhere
and hold many frames; a header is at most 14 bytes, the only bytes kept.

A message is counted at its final frame (FIN set, a data opcode or a
continuation): a fragmented message counts once, and control frames
(close, ping, pong) not at all. The first header byte says FIN and opcode,
so a message's end is known at the first byte of its final frame: that
offset is where the bytes of the message's decision start.

Client frames must be masked (RFC 6455 §5.1); reserved opcodes, a data frame
inside a fragmented message, a continuation outside one, a fragmented or
over-long (> 125) control frame and a 64-bit length with its top bit set are
malformed. The server direction is only tracked for its frame boundaries
(where Tollgate may put a close frame of its own), unchecked.
"""

from __future__ import annotations

import os
import struct
from typing import Final

CONTINUATION: Final = 0x0
CLOSE: Final = 0x8
DATA_OPCODES: Final = frozenset((0x1, 0x2))
CONTROL_OPCODES: Final = frozenset((0x8, 0x9, 0xA))
_LENGTH16: Final = struct.Struct("!H")
_LENGTH64: Final = struct.Struct("!Q")


def header_size(second: int) -> int:
    """A header's length from its second byte (mask bit and 7-bit length)."""
    size = 2 + (4 if second & 0x80 else 0)
    short = second & 0x7F
    return size + 2 if short == 126 else size + 8 if short == 127 else size


class FrameScanner:
    """Follows a stream of frames chunk by chunk (one direction of one connection).

    `feed(chunk)` returns the offsets in the chunk at which a message's final
    frame begins (always empty for the server direction). After malformed
    framing `error` says why and `clean` is how many bytes of that chunk
    precede the bad frame; the scanner then reads no further.
    """

    __slots__ = ("_client", "_fragmented", "_head", "_left", "clean", "error")

    def __init__(self, *, client: bool) -> None:
        self._client = client
        self._head = bytearray()  # the current frame's header so far, when a chunk split it
        self._left = 0  # payload bytes of the current frame still to come
        self._fragmented = False  # a data message has begun and not ended
        self.error: str | None = None
        self.clean = 0

    @property
    def at_boundary(self) -> bool:
        """Did the bytes fed so far end exactly at the end of a frame?"""
        return not self._left and not self._head

    def feed(self, data: bytes | memoryview) -> list[int]:
        ends: list[int] = []
        if self.error is not None:
            return ends
        pos, n = 0, len(data)
        head = self._head
        while pos < n:
            left = self._left
            if left:  # inside a payload: skip it
                step = min(left, n - pos)
                pos += step
                self._left = left - step
                continue
            start = pos if not head else 0  # where the frame began, as far as this chunk goes
            if not head:
                first = data[pos]
                if self._client:
                    why = self._check_first(first)
                    if why is not None:
                        return self._fail(why, pos, ends)
                    if first & 0x80 and first & 0x0F in (0x0, 0x1, 0x2):
                        ends.append(pos)
            need = header_size(head[1]) if len(head) >= 2 else 2
            while len(head) < need and pos < n:
                take = min(need - len(head), n - pos)
                head += data[pos:pos + take]
                pos += take
                if len(head) >= 2:
                    need = header_size(head[1])
            if len(head) < need:
                break  # the rest of the header comes with the next chunk
            why = self._complete(head)
            if why is not None:
                return self._fail(why, start, ends)
            head.clear()
        return ends

    def advance(self, data: bytes) -> int:
        """Feed `data` only as far as the end of the current frame; the bytes that took."""
        pos, n = 0, len(data)
        while pos < n and self.error is None and not (pos and self.at_boundary):
            step = min(self._left, n - pos) if self._left else 1  # a header byte by byte: 14 at most
            self.feed(data[pos:pos + step])
            pos += step
        return pos

    def _check_first(self, first: int) -> str | None:
        """The first header byte of a client frame: its opcode in its place."""
        opcode, fin = first & 0x0F, first & 0x80
        if opcode in CONTROL_OPCODES:
            return None if fin else "fragmented control frame"
        if opcode in DATA_OPCODES:
            if self._fragmented:
                return "new message inside a fragmented one"
        elif opcode == CONTINUATION:
            if not self._fragmented:
                return "continuation frame outside a fragmented message"
        else:
            return f"reserved opcode {opcode:#x}"
        self._fragmented = not fin
        return None

    def _complete(self, head: bytearray) -> str | None:
        """A whole header: the payload's length to skip, checked for a client."""
        short = head[1] & 0x7F
        if short == 126:
            length = _LENGTH16.unpack_from(head, 2)[0]
        elif short == 127:
            length = _LENGTH64.unpack_from(head, 2)[0]
            if length >> 63:
                return "64-bit payload length with its most significant bit set"
        else:
            length = short
        if self._client:
            if not head[1] & 0x80:
                return "unmasked client frame"
            if head[0] & 0x0F in CONTROL_OPCODES and length > 125:
                return "control frame longer than 125 bytes"
        self._left = length
        return None

    def _fail(self, why: str, clean: int, ends: list[int]) -> list[int]:
        self.error = why
        self.clean = clean
        return [end for end in ends if end < clean]


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame with `code` and `reason`; a client's frames (what Tollgate
    sends upstream) are masked with a fresh random key (RFC 6455 §5.3)."""
    payload = code.to_bytes(2, "big") + reason.encode()
    if not masked:
        return bytes((0x80 | CLOSE, len(payload))) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | CLOSE, 0x80 | len(payload))) + key + body
