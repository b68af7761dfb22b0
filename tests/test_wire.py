"""Canonical msgpack: the public msgpack test suite, canonical-form rules, limits, properties.

The suite is upstream's file, unchanged, in tests/vectors/public/msgpack-test-suite/.
A decoded value must equal the original in type as well as value (`same`):
0 == False and 1 == 1.0 in Python, but they are different values on the wire.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.core import wire
from node.core.errors import RemoteProtocolError

try:
    from _vectors import load_public
except ImportError:  # tests/ imported as a package
    from tests._vectors import load_public

SUITE = load_public("msgpack-test-suite/msgpack-test-suite.json")
UNSUPPORTED = ("float", "timestamp", "ext", "uint64 above int64")


def decoded_form(value):
    """What wire.unpack gives back for `value`: arrays as lists (a tuple packs as an array), map keys in
    canonical order (UTF-8 bytes), every other value as it is."""
    if isinstance(value, (list, tuple)):
        return [decoded_form(v) for v in value]
    if isinstance(value, dict):
        return {k: decoded_form(value[k]) for k in sorted(value, key=lambda k: k.encode("utf-8"))}
    return value


def same(got, want) -> bool:
    """Equal in type and value all the way down: False is not 0, 1 is not 1.0, b"a" is not "a",
    a tuple is not a list, and maps hold the same keys in the same order."""
    if type(got) is not type(want):
        return False
    if isinstance(want, list):
        return len(got) == len(want) and all(same(g, w) for g, w in zip(got, want))
    if isinstance(want, dict):
        return list(got) == list(want) and all(same(got[k], want[k]) for k in want)
    return got == want


def assert_decodes_to(got, value) -> None:
    assert same(got, decoded_form(value)), f"decoded {got!r}, expected {decoded_form(value)!r} (type-strict)"


def test_same_tells_apart_what_python_equality_does_not():
    for a, b in ((0, False), (1, True), (1, 1.0), (b"a", "a"), ([1], (1,)), (None, 0), ([0], [False]),
                 ({"a": [1]}, {"a": [True]}), ({"a": 1, "b": 2}, {"b": 2, "a": 1}), ([[b""]], [[""]])):
        assert not same(a, b) and not same(b, a)
    for value in (None, False, True, 0, -1, 2**63 - 1, "", "é", b"", b"\x00", [], {}, [0, False, b"", ""],
                  {"a": {"b": [None, True]}}):
        assert same(value, value) and same(decoded_form(value), value)
    assert same(decoded_form((1, (False,))), [1, [False]]) and not same((1,), [1])
    assert list(decoded_form({"b": 1, "a": 2, "B": 3})) == ["B", "a", "b"]


def _value(entry: dict):
    """The suite entry's value in Python, or raise LookupError for a type the wire refuses."""
    if "nil" in entry:
        return None
    if "bool" in entry:
        return entry["bool"]
    if "binary" in entry:
        return bytes.fromhex(entry["binary"].replace("-", ""))
    if "bignum" in entry:
        value = int(entry["bignum"])
        if not -(2**63) <= value < 2**63:
            raise LookupError("uint64 above int64")      # valid msgpack, but beyond what SQLite holds
        return value
    if "number" in entry:
        if isinstance(entry["number"], float):
            raise LookupError("float")
        return entry["number"]
    for key in ("string", "array", "map"):
        if key in entry:
            return entry[key]
    raise LookupError(next(k for k in entry if k != "msgpack"))


def _encodings(entry: dict) -> list[bytes]:
    return [bytes.fromhex(e.replace("-", "")) for e in entry["msgpack"]]


ENTRIES = [(group, i, entry) for group, entries in SUITE.items() for i, entry in enumerate(entries)]


def test_suite_is_what_we_expect():
    assert len(ENTRIES) > 80
    kinds = set().union(*(set(e) - {"msgpack"} for _, _, e in ENTRIES))
    assert {"nil", "bool", "binary", "number", "bignum", "string", "array", "map", "timestamp", "ext"} <= kinds


@pytest.mark.parametrize("group,index,entry", ENTRIES, ids=[f"{g}[{i}]" for g, i, _ in ENTRIES])
def test_msgpack_suite(group, index, entry):
    encodings = _encodings(entry)
    try:
        value = _value(entry)
    except LookupError as kind:
        assert kind.args[0] in UNSUPPORTED
        for raw in encodings:
            with pytest.raises(RemoteProtocolError):
                wire.unpack(raw)
        return
    canonical = wire.pack(value)
    assert canonical in encodings, "the suite lists the shortest form of every supported value"
    for raw in encodings:
        if raw == canonical:
            assert_decodes_to(wire.unpack(raw), value)
        else:
            with pytest.raises(RemoteProtocolError, match="malformed"):
                wire.unpack(raw)


def test_suite_non_canonical_encodings_decode_to_the_same_value_elsewhere():
    """The refusals above are about form, not content: plain msgpack reads them as the same value."""
    checked = 0
    for _, _, entry in ENTRIES:
        try:
            value = _value(entry)
        except LookupError:
            continue
        for raw in _encodings(entry):
            if raw != wire.pack(value) and raw[0] not in (0xCA, 0xCB):
                assert_decodes_to(msgpack.unpackb(raw, raw=False), value)
                checked += 1
    assert checked > 100


# --- canonical form -----------------------------------------------------------

def test_duplicate_map_keys_are_refused():
    raw = b"\x82\xa1a\x01\xa1a\x02"
    assert msgpack.unpackb(raw) == {"a": 2}          # what plain msgpack silently does
    with pytest.raises(RemoteProtocolError):
        wire.unpack(raw)
    with pytest.raises(RemoteProtocolError):
        wire.unpack(b"\x81\xa1x" + raw)                # nested


def test_keys_must_be_sorted_by_utf8_bytes():
    assert wire.pack({"b": 1, "a": 2, "B": 3, "ab": 4}) == b"\x84\xa1B\x03\xa1a\x02\xa2ab\x04\xa1b\x01"
    assert list(wire.unpack(wire.pack({"\u00e9": 1, "z": 2, "\U0001f600": 3}))) == ["z", "\u00e9", "\U0001f600"]
    for unsorted in ({"b": 1, "a": 2}, {"ab": 1, "a": 2}, {"a": 1, "B": 2}, {"x": {"b": 1, "a": 2}}):
        raw = msgpack.packb(unsorted)
        assert raw != wire.pack(unsorted)
        with pytest.raises(RemoteProtocolError):
            wire.unpack(raw)


def test_map_keys_must_be_strings():
    for raw in (b"\x81\x01\x01", b"\x81\xc4\x01a\x01", b"\x81\xc0\x01", b"\x81\x90\x01"):
        with pytest.raises(RemoteProtocolError):
            wire.unpack(raw)
    for bad in ({1: 1}, {b"a": 1}, {None: 1}):
        with pytest.raises(ValueError):
            wire.pack(bad)


def test_str_and_bin_are_distinct():
    assert wire.pack("a") == b"\xa1a" and wire.pack(b"a") == b"\xc4\x01a"
    assert wire.unpack(b"\xa1a") == "a" and wire.unpack(b"\xc4\x01a") == b"a"
    with pytest.raises(RemoteProtocolError):
        wire.unpack(b"\xa2\xff\xfe")                   # str that is not UTF-8


def test_pack_refuses_what_the_format_forbids():
    for bad in (0.5, 1.0, float("nan"), {1, 2}, bytearray(b"x"), object(), 2**63, 2**64, -(2**63) - 1, [1.5],
                {"a": {"b": 0.1}}):
        with pytest.raises(ValueError):
            wire.pack(bad)
    assert wire.pack((1, 2)) == wire.pack([1, 2])
    assert same(wire.unpack(wire.pack((1, (True, b"x")))), [1, [True, b"x"]])     # arrays come back as lists
    assert wire.unpack(wire.pack(2**63 - 1)) == 2**63 - 1
    with pytest.raises(RemoteProtocolError):          # valid msgpack, but beyond what SQLite can hold
        wire.unpack(b"\xcf" + (2**64 - 1).to_bytes(8, "big"))
    assert wire.unpack(wire.pack(-(2**63))) == -(2**63)


def test_floats_ext_and_timestamps_are_refused():
    for raw in (b"\xca\x00\x00\x00\x00", b"\xcb" + b"\x00" * 8, b"\xd4\x01\x10", b"\xd6\xff\x5a\x4a\xf6\xa5",
                b"\xc7\x00\x05", b"\x91\xca\x3f\x80\x00\x00"):
        with pytest.raises(RemoteProtocolError):
            wire.unpack(raw)


def test_depth_limit():
    ok = []
    for _ in range(wire.MAX_DEPTH):
        ok = [ok]
    assert wire.unpack(wire.pack(ok)) == ok
    too_deep = [ok]
    with pytest.raises(ValueError):
        wire.pack(too_deep)
    with pytest.raises(RemoteProtocolError):
        wire.unpack(b"\x91" * (wire.MAX_DEPTH + 1) + b"\x90")
    with pytest.raises(RemoteProtocolError):
        wire.unpack(b"\x91" * 100_000 + b"\x90", max_size=1 << 20)


def test_size_limit():
    raw = wire.pack(b"\x00" * 1000)
    assert wire.unpack(raw, max_size=len(raw)) == b"\x00" * 1000
    with pytest.raises(RemoteProtocolError, match=f"{len(raw)} bytes is over the {len(raw) - 1} byte limit"):
        wire.unpack(raw, max_size=len(raw) - 1)
    with pytest.raises(RemoteProtocolError, match="over the"):
        wire.unpack(wire.pack("x" * (1 << 20)))       # default limit is 1 MiB


def test_truncated_extra_and_empty_input_refused():
    raw = wire.pack({"a": [1, 2, b"xyz"], "b": "text"})
    for n in range(len(raw)):
        with pytest.raises(RemoteProtocolError):
            wire.unpack(raw[:n])
    for extra in (b"\x00", b"\xc0", raw):
        with pytest.raises(RemoteProtocolError):
            wire.unpack(raw + extra)


def test_input_type_and_error_names_what():
    assert wire.unpack(bytearray(b"\x01")) == 1 and wire.unpack(memoryview(b"\x01")) == 1
    with pytest.raises(RemoteProtocolError, match="^receipt: expected bytes"):
        wire.unpack("\x01", what="receipt")
    with pytest.raises(RemoteProtocolError, match="^receipt: malformed"):
        wire.unpack(b"\xc1", what="receipt")


# --- field helpers -------------------------------------------------------------

def test_field_helper():
    obj = {"n": 5, "b": True, "s": "abc", "x": b"12345678", "none": None}
    assert wire.field(obj, "n", int, what="m") == 5
    assert wire.field(obj, "x", bytes, what="m", size=8) == b"12345678"
    assert wire.field(obj, "none", int, what="m", optional=True) is None
    assert wire.field(obj, "gone", int, what="m", optional=True) is None
    assert wire.field(obj, "b", bool, what="m") is True
    cases = [("n", str, {}, "field 'n' has the wrong type"), ("b", int, {}, "field 'b' has the wrong type"),
             ("gone", int, {}, "missing field 'gone'"), ("none", int, {}, "missing field 'none'"),
             ("x", bytes, {"size": 7}, "field 'x' must be 7 bytes"),
             ("s", str, {"max_len": 2}, "field 's' is too long")]
    for name, kind, kwargs, message in cases:
        with pytest.raises(RemoteProtocolError) as info:
            wire.field(obj, name, kind, what="m", **kwargs)
        assert str(info.value) == f"m: {message}"
    with pytest.raises(RemoteProtocolError, match="expected a map"):
        wire.field([1], "n", int, what="m")


def test_only_fields_helper():
    wire.only_fields({"a": 1}, {"a", "b"}, what="m")
    with pytest.raises(RemoteProtocolError, match=r"unknown field\(s\) \['c', 'd'\]"):
        wire.only_fields({"a": 1, "d": 2, "c": 3}, {"a"}, what="m")
    for not_a_map in (5, None, "ab", b"ab", [1], ["a"], True):
        with pytest.raises(RemoteProtocolError) as info:
            wire.only_fields(not_a_map, {"a"}, what="m")
        assert str(info.value) == "m: expected a map"


# --- properties -----------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=50)
            | st.binary(max_size=50))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5)
                       | st.lists(inner, max_size=5).map(tuple)
                       | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(value=_values)
def test_round_trip(value):
    raw = wire.pack(value)
    back = wire.unpack(raw)
    assert_decodes_to(back, value)
    assert wire.pack(back) == raw
    assert_decodes_to(msgpack.unpackb(raw, raw=False), value)      # plain msgpack readers can read it too


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_decode_canonically_or_are_refused(raw):
    try:
        value = wire.unpack(raw)
    except RemoteProtocolError:
        return
    assert wire.pack(value) == raw


@settings(max_examples=300, deadline=None)
@given(value=_values, data=st.data())
def test_mutated_encodings_never_raise_anything_else(value, data):
    raw = bytearray(wire.pack(value))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    try:
        back = wire.unpack(bytes(raw))
    except RemoteProtocolError:
        return
    assert wire.pack(back) == bytes(raw) and not same(back, decoded_form(value))


def test_a_mutation_that_changes_only_the_type_is_a_different_value():
    """The case that once failed the property above: False -> 0 compares equal in Python."""
    cases = [(False, b"\x00", 0), ([True], b"\x91\x01", [1]), ({"a": 1}, b"\x81\xa1a\xc3", {"a": True})]
    for original, mutated, back in cases:
        assert wire.pack(original) != mutated
        got = wire.unpack(mutated)
        assert got == original                      # Python equality alone would call this "unchanged"
        assert same(got, back) and not same(got, decoded_form(original))
