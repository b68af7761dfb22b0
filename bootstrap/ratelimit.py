"""Per-client token buckets: a flood from one address gets 429s, everyone else is served.

Pure: the caller passes `now` (seconds, monotonic). The table of buckets is
bounded: buckets that have filled up again carry no information and are
dropped when the table grows; if a very wide flood still fills it, it is
cleared, which at worst lets each address start again from a full burst.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MAX_CLIENTS = 50_000


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

    def allow(self, client: str, now: float) -> bool:
        """Take one token for `client` if there is one."""
        b = self._buckets.get(client)
        if b is None:
            if len(self._buckets) >= MAX_CLIENTS:
                self._prune(now)
            b = self._buckets[client] = Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + (now - b.last) * self.rate)
        b.last = now
        if b.tokens >= 1:
            b.tokens -= 1
            return True
        return False

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
