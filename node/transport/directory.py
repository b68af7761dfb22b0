"""Client of the bootstrap directory API (docs/bootstrap.md): announce, look up, search.

A bootstrap is not trusted: every descriptor it returns is verified here
(signature, self-certifying ID, expiry) and checked against the question
(the node ID asked, a sequence number already known). A bad answer from one
bootstrap is an error for that bootstrap only; the `*_any` helpers ask each
of several and keep the best valid answer, so one bootstrap that withholds,
rolls back or forges changes nothing as long as another answers honestly.

The shapes of the requests and answers, and the checks, are node/core/directory.py
(shared with the server in bootstrap/). aiohttp's exceptions become PeerUnreachable,
PeerTimeout or PeerRefused.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Iterable, TypeVar
from urllib.parse import quote

import aiohttp

from ..core import directory as codec
from ..core.directory import MAX_ANSWER, Found, SyncPage, base_url as _base, verified
from ..core.errors import CabinetError, PeerRefused, PeerUnreachable, RemoteProtocolError, UsageError
from ..core.identity import MAX_DESCRIPTOR, Descriptor, normalize_node_id
from .client import map_exceptions

__all__ = ["Found", "SyncPage", "announce", "announce_all", "check", "lookup", "lookup_any", "now_ms", "search",
           "search_any", "search_any_flagged", "search_flagged", "sync_page", "verified"]

TIMEOUT = aiohttp.ClientTimeout(total=20, connect=5)
T = TypeVar("T")


def now_ms() -> int:
    return int(time.time() * 1000)


async def _call(session: aiohttp.ClientSession, method: str, url: str, path: str, *, data: bytes | None = None,
                params: dict | None = None, timeout: aiohttp.ClientTimeout = TIMEOUT) -> tuple[int, bytes]:
    base = _base(url)
    headers = {"Content-Type": codec.MSGPACK} if data is not None else None
    with map_exceptions(base):
        async with session.request(method, base + path, data=data, params=params, headers=headers,
                                   timeout=timeout) as resp:
            status = resp.status
            raw = await _read_all(resp, base)
    return status, raw


async def _read_all(resp: aiohttp.ClientResponse, base: str) -> bytes:
    """The whole body, or an error past MAX_ANSWER (StreamReader.read(n) returns what has arrived so far)."""
    if (resp.content_length or 0) > MAX_ANSWER:
        raise RemoteProtocolError(f"{base}: answer over {MAX_ANSWER} bytes")
    parts, size = [], 0
    while piece := await resp.content.read(MAX_ANSWER + 1 - size):
        parts.append(piece)
        size += len(piece)
        if size > MAX_ANSWER:
            raise RemoteProtocolError(f"{base}: answer over {MAX_ANSWER} bytes")
    return b"".join(parts)


def _error(url: str, status: int, raw: bytes, doing: str) -> PeerRefused:
    return PeerRefused(f"{_base(url)} refused to {doing}: {codec.error_reason(raw, status)}", status)


def check(d: Descriptor, *, node_id: str | None = None, min_seq: int = 0, now: int | None = None) -> Descriptor:
    """Refuse a verified descriptor that is not the one asked for, expired, or older than known."""
    return codec.check(d, node_id=node_id, min_seq=min_seq, now=now_ms() if now is None else now)


# --- one bootstrap --------------------------------------------------------------------

async def announce(session: aiohttp.ClientSession, url: str, descriptor_bytes: bytes) -> dict:
    """Publish a signed descriptor. Returns the answer ({"status": "stored" | "unchanged", "seq": n})."""
    check(verified(descriptor_bytes))          # never send what the bootstrap must refuse
    status, raw = await _call(session, "POST", url, codec.ANNOUNCE, data=bytes(descriptor_bytes))
    if status != 200:
        raise _error(url, status, raw, "store the descriptor")
    return codec.decode_map(raw, f"answer from {_base(url)}")


async def lookup(session: aiohttp.ClientSession, url: str, node_id: str, *, min_seq: int = 0,
                 now: int | None = None) -> Descriptor | None:
    """The verified descriptor of `node_id`, None if this bootstrap does not know it.

    Raises (RemoteProtocolError, InvalidSignature, ...) if the bootstrap answers with a
    descriptor that does not verify, is for another node, is expired or older than `min_seq`.
    """
    node_id = normalize_node_id(node_id)
    status, raw = await _call(session, "GET", url, codec.NODES + quote(node_id))
    if status == 404:
        return None
    if status != 200:
        raise _error(url, status, raw, "look up a node")
    if len(raw) > MAX_DESCRIPTOR:
        raise RemoteProtocolError("descriptor over the size limit")
    return check(verified(raw), node_id=node_id, min_seq=min_seq, now=now)


async def search_flagged(session: aiohttp.ClientSession, url: str, query: str, *,
                         now: int | None = None) -> list[Found]:
    """Verified results of `query`, each with its duplicate-identity flags (`Found.conflict`)."""
    status, raw = await _call(session, "GET", url, codec.SEARCH, params={"q": query})
    if status != 200:
        raise _error(url, status, raw, "search")
    return codec.decode_search(raw, f"answer from {_base(url)}", now=now_ms() if now is None else now)


async def search(session: aiohttp.ClientSession, url: str, query: str, *, now: int | None = None) -> list[Descriptor]:
    """Descriptors matching every word of `query`; any that fail to verify are dropped."""
    return [f.descriptor for f in await search_flagged(session, url, query, now=now)]


async def sync_page(session: aiohttp.ClientSession, url: str, since: int, *, limit: int = codec.SYNC_LIMIT,
                    wait: float = 0) -> SyncPage:
    """One page of a bootstrap's changes after `since` (long-polls up to `wait` seconds if none)."""
    timeout = aiohttp.ClientTimeout(total=wait + 30, connect=5)
    status, raw = await _call(session, "GET", url, codec.SYNC, params=codec.sync_params(since, limit, wait),
                              timeout=timeout)
    if status != 200:
        raise _error(url, status, raw, "send its changes")
    return SyncPage.from_wire(raw, f"sync page from {_base(url)}")


# --- several bootstraps ----------------------------------------------------------------

async def _each(urls: Iterable[str], session: aiohttp.ClientSession | None,
                fn: Callable[[aiohttp.ClientSession, str], Awaitable[T]]) -> list[T | CabinetError]:
    urls = list(urls)
    if not urls:
        raise UsageError("no bootstrap server configured")
    own = session is None
    session = session or aiohttp.ClientSession()
    try:
        async def one(url: str) -> T | CabinetError:
            try:
                return await fn(session, url)
            except CabinetError as exc:
                return exc
        return list(await asyncio.gather(*(one(u) for u in urls)))
    finally:
        if own:
            await session.close()


def _all_failed(results: list, doing: str) -> CabinetError:
    errors = [r for r in results if isinstance(r, CabinetError)]
    if len(errors) == 1:
        return errors[0]
    return PeerUnreachable(f"no bootstrap could {doing} ({len(errors)} tried; first: {errors[0]})")


async def announce_all(urls: Iterable[str], descriptor_bytes: bytes, *,
                       session: aiohttp.ClientSession | None = None) -> dict[str, dict | CabinetError]:
    """Announce to each bootstrap; returns each one's answer or error. One accepting is enough."""
    urls = list(urls)
    check(verified(descriptor_bytes))
    results = await _each(urls, session, lambda s, u: announce(s, u, descriptor_bytes))
    return dict(zip(urls, results))


async def lookup_any(urls: Iterable[str], node_id: str, *, session: aiohttp.ClientSession | None = None,
                     min_seq: int = 0, now: int | None = None) -> Descriptor | None:
    """Ask every bootstrap; the valid answer with the highest seq wins, bad answers are ignored.

    None if no bootstrap knows the node; raises only if none gave a usable answer at all.
    """
    node_id = normalize_node_id(node_id)
    results = await _each(urls, session, lambda s, u: lookup(s, u, node_id, min_seq=min_seq, now=now))
    found = [r for r in results if isinstance(r, Descriptor)]
    if found:
        return max(found, key=lambda d: d.seq)
    if any(r is None for r in results):
        return None
    raise _all_failed(results, "answer the lookup")


async def search_any_flagged(urls: Iterable[str], query: str, *, session: aiohttp.ClientSession | None = None,
                             now: int | None = None) -> list[Found]:
    """Search every bootstrap; merge the verified results (highest seq per node, every flag kept,
    plus the conflicts among the merged results), sorted by name."""
    results = await _each(urls, session, lambda s, u: search_flagged(s, u, query, now=now))
    lists = [r for r in results if isinstance(r, list)]
    if not lists:
        raise _all_failed(results, "search")
    return codec.merge(f for lst in lists for f in lst)


async def search_any(urls: Iterable[str], query: str, *, session: aiohttp.ClientSession | None = None,
                     now: int | None = None) -> list[Descriptor]:
    """Search every bootstrap; merge the verified results (highest seq per node), sorted by name."""
    return [f.descriptor for f in await search_any_flagged(urls, query, session=session, now=now)]
