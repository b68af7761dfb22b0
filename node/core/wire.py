"""Canonical msgpack: the one encoding for everything that is signed or sent.

Canonical means: maps have string keys sorted by their UTF-8 bytes, integers
use their shortest form, strings are str and binary is bin, no floats and no
extension types. `unpack` accepts only bytes that `pack` would have produced
(it re-encodes and compares), so two different byte strings never decode to
the same value and a signature over raw bytes means one thing.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, cast

import msgpack

from .errors import RemoteProtocolError

MAX_DEPTH = 16


def _canon(obj: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    if obj is None or isinstance(obj, (bool, int, str, bytes)):
        if isinstance(obj, int) and not isinstance(obj, bool) and not -(2**63) <= obj < 2**63:
            raise ValueError("integer out of range")
        return obj
    if isinstance(obj, (list, tuple)):
        return [_canon(x, depth + 1) for x in obj]
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise ValueError("map keys must be strings")
        keys = sorted(obj, key=lambda k: k.encode("utf-8"))
        return {k: _canon(obj[k], depth + 1) for k in keys}
    raise ValueError(f"type {type(obj).__name__} is not allowed on the wire")


def pack(obj: Any) -> bytes:
    """Encode `obj` canonically. Raises ValueError for values the format forbids."""
    packed: bytes = msgpack.packb(_canon(obj), use_bin_type=True)
    return packed


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError("extension types are not allowed")


def _sorted_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Called by msgpack for every map: keys must be str, unique and in canonical order."""
    prev = None
    for key, _ in pairs:
        if not isinstance(key, str):
            raise ValueError("map keys must be strings")
        raw = key.encode("utf-8")
        if prev is not None and raw <= prev:
            raise ValueError("map keys duplicated or out of order")
        prev = raw
    return dict(pairs)


_LEAVES = frozenset({type(None), bool, int, str, bytes})


def _check_types(obj: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("nested too deeply")
    t = type(obj)
    if t is int and not -(2**63) <= obj < 2**63:
        raise ValueError("integer out of range")    # SQLite and most peers stop at 64-bit signed
    if t in _LEAVES:
        return
    if t is list:
        for x in obj:
            _check_types(x, depth + 1)
    elif t is dict:
        for x in obj.values():
            _check_types(x, depth + 1)
    else:
        raise ValueError(f"type {t.__name__} is not allowed on the wire")


def unpack(data: bytes, *, max_size: int = 1 << 20, what: str = "message") -> Any:
    """Decode canonical msgpack, or raise RemoteProtocolError naming `what`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError(f"{what}: expected bytes")
    if len(data) > max_size:
        raise RemoteProtocolError(f"{what}: {len(data)} bytes is over the {max_size} byte limit")
    try:
        obj = msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=True,
            object_pairs_hook=_sorted_map,
            ext_hook=_refuse_ext,
            timestamp=0,
            use_list=True,
        )
        _check_types(obj)
        # Maps were checked in order as they were read, so re-encoding in that
        # order must give the same bytes: this catches non-shortest integers,
        # str/bin mix-ups and any other second spelling of the same value.
        if msgpack.packb(obj, use_bin_type=True) != bytes(data):
            raise ValueError("not in canonical form")
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData, RecursionError):
        raise RemoteProtocolError(f"{what}: malformed or damaged") from None
    return obj


# --- field validation helpers used by every from_wire() -------------------

def field(obj: Any, name: str, kind: type | tuple[type, ...], *, what: str, optional: bool = False,
          size: int | None = None, max_len: int | None = None) -> Any:
    """Fetch obj[name] and check its type and length, or raise RemoteProtocolError."""
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what}: expected a map")
    if name not in obj or obj[name] is None:
        if optional:
            return None
        raise RemoteProtocolError(f"{what}: missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) and kind is int:
        raise RemoteProtocolError(f"{what}: field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise RemoteProtocolError(f"{what}: field {name!r} has the wrong type")
    if size is not None and len(cast(Sized, value)) != size:
        raise RemoteProtocolError(f"{what}: field {name!r} must be {size} bytes")
    if max_len is not None and len(cast(Sized, value)) > max_len:
        raise RemoteProtocolError(f"{what}: field {name!r} is too long")
    return value


def only_fields(obj: object, allowed: set[str], *, what: str) -> None:
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"{what}: expected a map")
    extra = set(obj) - allowed
    if extra:
        raise RemoteProtocolError(f"{what}: unknown field(s) {sorted(extra)}")
