"""Who a client is, and how much it may do: per-client token buckets, so a flood from one
address gets 429s while everyone else is served, and the quota of new identities.

Pure: the caller passes `now` (seconds, monotonic). The table of buckets is
bounded: buckets that have filled up again carry no information and are
dropped when the table grows; if a very wide flood still fills it, it is
cleared, which at worst lets each address start again from a full burst.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

from node.core.errors import UsageError

MAX_CLIENTS = 50_000
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_key(remote: str | None) -> str:
    """An IPv4 address, or the /64 of an IPv6 one (a single site usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "?"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def block_key(remote: str | None) -> str:
    """The address block a client's new identities are counted in: its IPv4 /24 or IPv6 /56."""
    try:
        ip = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "?"
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = 24 if ip.version == 4 else 56
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


def parse_proxies(texts: Iterable[str]) -> tuple[Network, ...]:
    """`--trust-proxy` values: an address or a network (10.0.0.0/8)."""
    nets = []
    for text in texts:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise UsageError(f"--trust-proxy wants an IP address or network (got {text[:60]!r})") from None
    return tuple(nets)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str | None:
    """The client's address: the connection's, unless it comes from a trusted proxy.

    From a trusted proxy, X-Forwarded-For is read from the right (each proxy appends the address
    it was called from) and the first address that is not itself a trusted proxy is the client.
    A malformed entry stops the walk at the last address known good.
    """
    here = _ip(peer or "")
    if here is None or not any(here in net for net in trusted):
        return peer
    hops = [h for header in forwarded_for for h in header.split(",")]
    for hop in reversed(hops):
        ip = _ip(hop)
        if ip is None:
            break
        here = ip
        if not any(ip in net for net in trusted):
            break
    return str(here)


@dataclass(slots=True)
class Bucket:
    tokens: float
    last: float


class RateLimiter:
    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, Bucket] = {}

    def _refilled(self, client: str, now: float) -> Bucket:
        b = self._buckets.get(client)
        if b is None:
            if len(self._buckets) >= MAX_CLIENTS:
                self._prune(now)
            b = self._buckets[client] = Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.last) * self.rate)
        b.last = now
        return b

    def allow(self, client: str, now: float) -> bool:
        """Take one token for `client` if there is one."""
        b = self._refilled(client, now)
        if b.tokens >= 1:
            b.tokens -= 1
            return True
        return False

    def available(self, client: str, now: float) -> bool:
        """Whether `allow` would let `client` through now (nothing is taken)."""
        return self._refilled(client, now).tokens >= 1

    def retry_after(self, client: str) -> float:
        b = self._buckets.get(client)
        return 0.0 if b is None else max(0.0, (1 - b.tokens) / self.rate)

    def _prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.last) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= MAX_CLIENTS:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)


class NewIdentityQuota:
    """How many identities the bootstrap never saw may be announced: `per_block` per address block
    and `total` from everyone, each refilled over `period` seconds (a token bucket, so a block may
    announce `per_block` at once, then one every period/per_block seconds)."""

    def __init__(self, per_block: int, total: int, period: float) -> None:
        if per_block < 1 or total < 1 or period <= 0:
            raise ValueError("new-identity caps must be at least 1 and the period positive")
        self.block = RateLimiter(per_block / period, per_block)
        self.everyone = RateLimiter(total / period, total)

    def admit(self, block: str, now: float) -> float:
        """0 if a new identity from `block` is admitted (and counted); else seconds to wait."""
        if not self.block.available(block, now):
            return max(1.0, self.block.retry_after(block))
        if not self.everyone.available("*", now):
            return max(1.0, self.everyone.retry_after("*"))
        self.block.allow(block, now)
        self.everyone.allow("*", now)
        return 0.0
