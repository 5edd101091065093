"""The frame scanner and the message gate, on streams cut anywhere.

Hypothesis builds sequences of valid client frames (fragmented messages with
control frames between fragments, 7-, 16- and 64-bit lengths), serializes
them, cuts the bytes into random chunks and checks that the scanner finds
exactly each message's final frame and that the gate relays the very same
bytes. A table covers each kind of malformed framing.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import LimitSet
from proxy.limiter import Limiter
from proxy.limits.algorithms import FixedWindow
from proxy.limits.memory import MemoryStore
from proxy.limits.store import Limit
from proxy.wsframes import FrameScanner, close_frame
from proxy.wsgate import GateClosed, MessageGate, MessageLimits

PAYLOAD = bytes(range(251)) * 300  # longer than the longest size below
SIZES = st.sampled_from([0, 1, 5, 125, 126, 127, 300, 65535, 65536, 70000])


def frame(opcode: int, size: int, *, fin: bool = True, mask: bool = True) -> bytes:
    payload = PAYLOAD[:size]
    if size < 126:
        head = bytes((0x80 * fin | opcode, 0x80 * mask | size))
    elif size < 1 << 16:
        head = bytes((0x80 * fin | opcode, 0x80 * mask | 126)) + struct.pack("!H", size)
    else:
        head = bytes((0x80 * fin | opcode, 0x80 * mask | 127)) + struct.pack("!Q", size)
    return head + (os.urandom(4) if mask else b"") + payload


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """Valid client frames, and the offset of each message's final frame."""
    data, ends = b"", []
    for _ in range(draw(st.integers(0, 6))):
        opcode = draw(st.sampled_from([0x1, 0x2, 0x9, 0xA, 0x8]))
        if opcode >= 0x8:  # a control frame between messages
            data += frame(opcode, draw(st.integers(0, 125)))
            continue
        fragments = draw(st.integers(1, 4))
        for i in range(fragments):
            if i and draw(st.booleans()):  # a control frame between fragments
                data += frame(draw(st.sampled_from([0x9, 0xA])), draw(st.integers(0, 125)))
            final = i == fragments - 1
            if final:
                ends.append(len(data))
            data += frame(opcode if i == 0 else 0x0, draw(SIZES), fin=final)
    return data, ends


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


class Collect:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes | memoryview) -> None:
        self.chunks.append(bytes(data))


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never waits (a memory store decides inline)."""
    with pytest.raises(StopIteration):
        coro.send(None)


def gate(limit: int = 1_000_000) -> MessageGate:
    limits = (Limit(name="chat", algorithm=FixedWindow(limit=limit, window=60), key="route-x-ws.chat.fw"),)
    return MessageGate(MessageLimits(Limiter(MemoryStore(lambda: 0.0)), LimitSet(limits), ("client",)))


@settings(max_examples=150, deadline=None)
@given(streams(), st.lists(st.integers(0, 1 << 20), max_size=40))
def test_any_chunking_finds_the_same_messages_and_relays_the_same_bytes(stream, points):
    data, ends = stream
    scanner, found, offset = FrameScanner(client=True), [], 0
    chunks = cut(data, points)
    for chunk in chunks:
        found += [offset + end for end in scanner.feed(chunk)]
        offset += len(chunk)
    assert scanner.error is None
    assert found == ends
    assert scanner.at_boundary
    relay, sink = gate(), Collect()
    for chunk in chunks:
        run(relay.relay(chunk, sink))
    assert b"".join(sink.chunks) == data
    assert relay.messages == len(ends)


@settings(max_examples=50, deadline=None)
@given(streams(), st.lists(st.integers(0, 1 << 20), max_size=40), st.integers(1, 4))
def test_the_message_over_the_limit_is_cut_where_its_final_frame_begins(stream, points, limit):
    data, ends = stream
    relay, sink = gate(limit), Collect()
    closed: GateClosed | None = None
    for chunk in cut(data, points):
        try:
            run(relay.relay(chunk, sink))
        except GateClosed as exc:
            closed = exc
            break
    out = b"".join(sink.chunks)
    if len(ends) <= limit:
        assert closed is None and out == data
    else:
        assert closed is not None and (closed.code, closed.reason, closed.limit) == (1008, "rate limited", "chat")
        # everything before the refused message's final frame, then a masked close frame
        assert out[:ends[limit]] == data[:ends[limit]]
        tail = out[ends[limit]:]
        assert tail[:2] == b"\x88\x8e" and len(tail) == 2 + 4 + 14


@pytest.mark.parametrize(("first", "bad", "why"), [
    (b"", frame(0x1, 3, mask=False), "unmasked client frame"),
    (b"", frame(0x3, 3), "reserved opcode 0x3"),
    (b"", frame(0xB, 3), "reserved opcode 0xb"),
    (b"", frame(0x9, 3, fin=False), "fragmented control frame"),
    (b"", frame(0x9, 126), "control frame longer than 125 bytes"),
    (b"", bytes((0x82, 0xFF, 0x80)) + bytes(11), "64-bit payload length with its most significant bit set"),
    (b"", frame(0x0, 3), "continuation frame outside a fragmented message"),
    (frame(0x1, 3, fin=False), frame(0x2, 3), "new message inside a fragmented one"),
])
def test_malformed_framing_stops_the_scanner_before_the_bad_frame(first, bad, why):
    good = frame(0x1, 5) + first
    whole = FrameScanner(client=True)
    assert whole.feed(good + bad + frame(0x1, 1)) == [0]
    assert (whole.error, whole.clean) == (why, len(good))
    split = FrameScanner(client=True)  # the bad header split after its first byte
    split.feed(good + bad[:1])
    if split.error is None:  # the first byte was fine: the rest is in the next chunk
        split.feed(bad[1:])
        assert (split.error, split.clean) == (why, 0)
    else:
        assert (split.error, split.clean) == (why, len(good))


def test_close_frames_are_masked_towards_the_upstream_only():
    plain = close_frame(1008, "rate limited", masked=False)
    assert plain == b"\x88\x0e\x03\xf0rate limited"
    masked = close_frame(1008, "rate limited", masked=True)
    key, body = masked[2:6], masked[6:]
    assert masked[:2] == b"\x88\x8e"
    assert bytes(b ^ key[i % 4] for i, b in enumerate(body)) == b"\x03\xf0rate limited"
    scanner = FrameScanner(client=True)
    assert scanner.feed(masked) == [] and scanner.error is None and scanner.at_boundary


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x1, 0x2, 0x9]), SIZES), min_size=1, max_size=5), st.integers(0, 1 << 20))
def test_advance_stops_exactly_at_the_end_of_the_server_frame_under_way(frames, point):
    """What the tunnel relays of the upstream before its own close frame to the client."""
    parts = [frame(opcode, size, mask=False) for opcode, size in frames]
    data = b"".join(parts)
    bounds = list(itertools.accumulate(len(p) for p in parts))
    point %= len(data)
    scanner = FrameScanner(client=False)
    scanner.feed(data[:point])
    if point in (0, *bounds):
        assert scanner.at_boundary
        return
    taken = scanner.advance(data[point:])
    assert point + taken == min(b for b in bounds if b > point)
    assert scanner.at_boundary
