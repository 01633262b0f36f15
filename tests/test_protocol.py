"""Unit tests of protocol.py: round trips and every malformed-frame case."""

import dataclasses
import io
import json
import os
import random
import subprocess
import sys
import threading

import pytest

import protocol
from protocol import NEED_DATA, FrameDecoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def frame(header: dict, body: bytes = b"") -> bytes:
    data = json.dumps(header).encode()
    return len(data).to_bytes(4, "big") + data + body


SAMPLES = [
    protocol.Hello(version=1, role="client"),
    protocol.UploadBegin(name="dir/ä file.txt", size=10, tag=3),
    protocol.Data(body=b"hello"),
    protocol.Data(body=b""),
    protocol.UploadEnd(sha256="ab" * 32),
    protocol.Download(name="x", offset=5, length=-1),
    protocol.ListPage(entries=[{"name": "a", "size": 1, "chunks": 1, "mtime": 1.5}], done=True),
    protocol.PutChunks(blob="b1", first=7, count=2, chunk_size=64, body=bytes(8) + b"x" * 100),
    protocol.ChunkData(blob="b1", first=7, count=3, chunk_size=64, missing=[[8, 1]], corrupt=[[7, 1]],
                       body=bytes(12) + b"x" * 150),
    protocol.Error(code="FILE_NOT_FOUND", message="no file named 'x'"),
    protocol.StatusReply(nodes=[], totals={"files": 0}),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.OP)
def test_round_trip_through_file(msg):
    """Every message survives encode -> read_message unchanged."""
    decoded = protocol.read_message(io.BytesIO(protocol.encode(msg)))
    if msg.HAS_BODY:
        assert bytes(decoded.body) == bytes(msg.body)
        decoded = type(msg)(**{**decoded.__dict__, "body": msg.body})
    assert decoded == msg


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.OP)
def test_round_trip_byte_by_byte(msg):
    """The incremental decoder returns NEED_DATA until the last byte, then the message."""
    data = protocol.encode(msg)
    decoder = FrameDecoder()
    for i, byte in enumerate(data):
        decoder.feed(bytes([byte]))
        result = decoder.next_message()
        if i < len(data) - 1:
            assert result is NEED_DATA
    assert result == msg if not msg.HAS_BODY else bytes(result.body) == bytes(msg.body)
    assert decoder.buffered == 0


def test_several_frames_in_one_feed():
    """Pipelined frames fed at once come out one by one, in order."""
    decoder = FrameDecoder()
    decoder.feed(b"".join(protocol.encode(m) for m in SAMPLES[:4]))
    out = [decoder.next_message() for _ in range(4)]
    assert [m.OP for m in out] == [m.OP for m in SAMPLES[:4]]
    assert decoder.next_message() is NEED_DATA


def test_example_frame_from_docstring():
    """The frame shown in the module docstring is what encode produces."""
    assert protocol.encode(protocol.Data(body=b"abc")) == b'\x00\x00\x00\x16{"op":"DATA","body":3}abc'


def test_clean_eof_returns_none():
    """EOF at a frame boundary is a normal end of stream."""
    assert protocol.read_message(io.BytesIO(b"")) is None


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
def test_truncated_frame_raises(cut):
    """A frame cut anywhere raises RemoteProtocolError, never returns garbage."""
    data = protocol.encode(protocol.Data(body=b"payload!"))
    with pytest.raises(protocol.RemoteProtocolError):
        protocol.read_message(io.BytesIO(data[:cut]))
    with pytest.raises(protocol.RemoteProtocolError):
        protocol.read_message(io.BytesIO(data[:-1]))


def test_truncated_at_every_offset():
    """Every proper prefix of a valid frame is refused by the blocking reader."""
    data = protocol.encode(protocol.PutChunks(blob="b", first=0, count=1, chunk_size=64, body=bytes(4) + b"z"))
    for cut in range(1, len(data)):
        with pytest.raises(protocol.RemoteProtocolError):
            protocol.read_message(io.BytesIO(data[:cut]))


MALFORMED = {
    "empty header": (0).to_bytes(4, "big"),
    "not json": (5).to_bytes(4, "big") + b"hello",
    "bad utf8": (2).to_bytes(4, "big") + b"\xff\xfe",
    "json array": frame([1, 2]) if False else (6).to_bytes(4, "big") + b"[1, 2]",
    "no op": frame({"name": "x"}),
    "op not string": frame({"op": 5}),
    "unknown op": frame({"op": "FORMAT_DISK"}),
    "missing field": frame({"op": "DELETE"}),
    "wrong type": frame({"op": "DELETE", "name": 5}),
    "bool for int": frame({"op": "DOWNLOAD", "name": "x", "offset": True}),
    "extra field": frame({"op": "DELETE", "name": "x", "evil": 1}),
    "body on bodyless op": frame({"op": "DELETE", "name": "x", "body": 3}, b"abc"),
    "negative body": frame({"op": "DATA", "body": -1}),
    "string body length": frame({"op": "DATA", "body": "3"}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_are_refused(case):
    """Each malformed frame raises RemoteProtocolError from both readers."""
    data = MALFORMED[case]
    with pytest.raises(protocol.RemoteProtocolError):
        protocol.read_message(io.BytesIO(data))
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(protocol.RemoteProtocolError):
        decoder.next_message()


def test_unknown_op_has_its_own_code():
    """An unknown operation maps to UNKNOWN_OP so the client can say so."""
    with pytest.raises(protocol.UnknownOperation):
        protocol.read_message(io.BytesIO(MALFORMED["unknown op"]))


class CountingReader(io.BytesIO):
    """A reader that fails the test if asked for a huge read."""

    def read(self, size=-1):
        assert size is not None and 0 <= size <= protocol.MAX_HEADER_BYTES
        return super().read(size)


def test_oversized_header_refused_before_reading_it():
    """A header length above the limit is refused from the prefix alone."""
    data = (protocol.MAX_HEADER_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(protocol.FrameTooLarge):
        protocol.read_message(CountingReader(data))
    decoder = FrameDecoder()
    decoder.feed(data)
    with pytest.raises(protocol.FrameTooLarge):
        decoder.next_message()


def test_oversized_body_refused_before_allocating():
    """A body length above the limit is refused from the header alone."""
    data = frame({"op": "DATA", "body": protocol.MAX_BODY_BYTES + 1})
    with pytest.raises(protocol.FrameTooLarge):
        protocol.read_message(CountingReader(data))


def test_local_oversized_body_cannot_be_sent():
    """Encoding a body over the limit is our own bug and says so."""
    with pytest.raises(protocol.LocalProtocolError):
        protocol.encode(protocol.Data(body=bytes(protocol.MAX_BODY_BYTES + 1)))


def test_body_read_into_given_buffer():
    """With a large enough buffer, the body is read in place and not copied."""
    buffer = bytearray(16)
    msg = protocol.read_message(io.BytesIO(protocol.encode(protocol.Data(body=b"12345"))), buffer)
    assert bytes(buffer[:5]) == b"12345"
    assert msg.body.obj is buffer


@pytest.mark.parametrize("name", ["a", "dir/sub/file.txt", "with space", "ünïcødé/файл", "x" * 1024])
def test_valid_names(name):
    """Slashes, spaces, non-ASCII and the maximum length are accepted."""
    assert protocol.validate_name(name) == name


@pytest.mark.parametrize("name", ["", "a\x00b", "tab\there", "new\nline", "x" * 1025, "é" * 513])
def test_invalid_names(name):
    """Empty, control characters and names over 1024 bytes are refused."""
    with pytest.raises(protocol.InvalidName):
        protocol.validate_name(name)


def test_crc_helpers_round_trip_and_detect_flips():
    """CRCs survive their wire form, and a flipped byte is located."""
    rng = random.Random(1)
    payload = bytearray(rng.randbytes(1024 * 3 + 100))
    crcs = protocol.chunk_crcs(payload, 1024)
    assert len(crcs) == 4
    wire = protocol.crcs_to_bytes(crcs)
    assert protocol.crcs_from_bytes(wire) == crcs
    assert protocol.verify_chunks(payload, wire, 1024) == -1
    payload[2048 + 5] ^= 0xFF
    assert protocol.verify_chunks(payload, wire, 1024) == 2


def test_bad_chunk_ranges_lists_each_damaged_run():
    """bad_chunk_ranges names runs of damaged chunks, counting chunks the payload is too short for."""
    rng = random.Random(2)
    payload = bytearray(rng.randbytes(64 * 9 + 10))
    wire = protocol.crcs_to_bytes(protocol.chunk_crcs(payload, 64))
    assert protocol.bad_chunk_ranges(payload, wire, 64) == []
    for chunk in (1, 2, 3, 6, 9):
        payload[chunk * 64 + 3] ^= 1
    assert protocol.bad_chunk_ranges(payload, wire, 64) == [(1, 3), (6, 1), (9, 1)]
    assert protocol.bad_chunk_ranges(payload[:64 * 7 + 5], wire, 64) == [(1, 3), (6, 4)]


@pytest.mark.parametrize("value", [
    "x", [[1]], [[0, 0]], [[-1, 2]], [[2, 4]], [[True, 1]], [[1.0, 1]], [[1, 1]] * (protocol.MAX_CHUNK_RANGES + 1),
])
def test_chunk_ranges_refuses_what_is_not_inside_the_request(value):
    """A peer's chunk range list must be [first, count] pairs inside the request, and not too many."""
    with pytest.raises(protocol.RemoteProtocolError):
        protocol.chunk_ranges(value, 1, 4)


def test_chunk_ranges_accepts_and_sorts():
    """None is no ranges; valid ranges come back sorted as tuples."""
    assert protocol.chunk_ranges(None, 0, 4) == []
    assert protocol.chunk_ranges([[3, 2], [1, 1]], 1, 4) == [(1, 1), (3, 2)]


def test_errors_map_back_to_their_class():
    """Every error code sent in an ERROR frame comes back as the same class."""
    for code, cls in protocol._ERRORS_BY_CODE.items():
        err = protocol.error_from_code(code, "m")
        assert isinstance(err, cls) and err.code == code
    assert type(protocol.error_from_code("SOMETHING_NEW", "m")) is protocol.BackupError


def test_expect_raises_the_error_frame():
    """expect() turns an ERROR reply into its exception."""
    with pytest.raises(protocol.FileNotFound):
        protocol.expect(protocol.Error(code="FILE_NOT_FOUND", message="gone"), protocol.FileInfo)
    with pytest.raises(protocol.Unavailable):
        protocol.expect(None, protocol.FileInfo)


def test_importing_protocol_builds_no_message_dataclass():
    """Message classes are not turned into dataclasses at import (that cost every program ~50 ms of start-up)."""
    code = ("import protocol; "
            "print(len(protocol._MESSAGES), sum('__dataclass_fields__' in vars(c) for c in protocol._MESSAGES.values()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    registered, built = map(int, out.split())
    assert registered > 40 and built == 0


def sample(types: tuple):
    """A value of the first JSON type a field accepts."""
    return {int: 7, float: 1.5, str: "s", bool: True, list: [1], dict: {"k": 1}, type(None): None}[types[0]]


@pytest.mark.parametrize("cls", sorted(protocol._MESSAGES.values(), key=lambda c: c.OP), ids=lambda c: c.OP)
def test_every_message_is_a_frozen_dataclass_of_its_declared_fields(cls):
    """On first use each message class becomes a frozen dataclass whose fields, defaults and wire form match
    what @message registered."""
    values = {name: sample(types) for name, types, required in cls._FIELDS}
    msg = cls(**values, **({"body": b"xyz"} if cls.HAS_BODY else {}))
    assert dataclasses.is_dataclass(msg)
    fields = [f for f in dataclasses.fields(cls) if f.name != "body"]
    assert [(f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in fields] == [(name, required) for name, _, required in cls._FIELDS]
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.extra = 1
    decoded = protocol.read_message(io.BytesIO(protocol.encode(msg)))
    if cls.HAS_BODY:
        assert bytes(decoded.body) == b"xyz"
        decoded = dataclasses.replace(decoded, body=b"xyz")
    assert decoded == msg
    required_only = {name: values[name] for name, _, required in cls._FIELDS if required}
    assert cls(**required_only) == protocol.read_message(io.BytesIO(protocol.encode(cls(**required_only))))


def test_first_use_from_many_threads_builds_the_class_once():
    """Threads that instantiate a message class for the first time at once all get a sound instance."""
    @protocol.message
    class Probe(protocol.Message):
        OP = "TEST_PROBE"
        name: str
        items: list = dataclasses.field(default_factory=list)
        note: str | None = None

    try:
        barrier = threading.Barrier(8)
        made, errors = [], []

        def make(i):
            barrier.wait()
            try:
                made.append(Probe(name=str(i)))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=make, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(made) == 8
        assert len({id(m.items) for m in made}) == 8  # a fresh list each
        data = protocol.encode(made[0])
        assert b'"note"' not in data  # default None: left out of the header
        assert protocol.read_message(io.BytesIO(data)) == made[0]
    finally:
        del protocol._MESSAGES["TEST_PROBE"]


def test_message_field_of_a_non_json_type_is_refused_at_definition():
    """A field annotated with a type JSON cannot carry fails when the message is defined, not on the wire."""
    with pytest.raises(protocol.LocalProtocolError, match="not a JSON type"):
        @protocol.message
        class Bad(protocol.Message):
            OP = "TEST_BAD"
            when: set
    assert "TEST_BAD" not in protocol._MESSAGES
