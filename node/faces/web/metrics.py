"""GET /metrics: the running node's counters in the Prometheus text format (0.0.4).

Behind the same gate as the API: an API token with the `admin` scope (Prometheus's
`authorization: {credentials: cab_...}`), or a signed-in account's session. Counters come
from the event stream (app/health.py's Metrics); disk, backup age, open alerts and
deliveries by state are read at each scrape. Labels are event types, states, reason
codes, alert rules and route patterns: never a patient, a contact's name or a file name.
"""

from __future__ import annotations

from aiohttp import web

from ...node import Node
from .api import Route
from .keys import NODE, ROUTE_SPECS

PREFIX = "cabinet_"
HELP = {
    "records_received_total": ("counter", "records received from colleagues, by kind"),
    "received_bytes_total": ("counter", "bytes of records received"),
    "records_stored_total": ("counter", "records this node sealed and queued (sent, replies, copies), by kind"),
    "sent_bytes_total": ("counter", "bytes of record bodies uploaded to colleagues"),
    "deliveries_total": ("counter", "delivery state changes, by new state"),
    "delivery_retries_total": ("counter", "deliveries rescheduled after a failed attempt"),
    "refusals_total": ("counter", "requests or records refused, by reason code"),
    "sign_in_failures_total": ("counter", "failed sign-ins at the web app and local API"),
    "alerts_raised_total": ("counter", "alerts raised, by rule"),
    "events_total": ("counter", "events published by the node's services, by type"),
}


def _labels(pairs) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(node: Node, gauges: dict) -> str:
    m = node.metrics
    lines: list[str] = []
    by_name: dict[str, list] = {}
    for (name, labels), value in sorted(m.counters.items()):
        by_name.setdefault(name, []).append((labels, value))
    for name, (kind, text) in HELP.items():
        lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}"]
        lines += [f"{PREFIX}{name}{_labels(labels)} {value:g}" for labels, value in by_name.get(name, [])]
    lines += _latency(m)
    lines += _gauge("disk_free_bytes", "free space on the data folder's disk", [((), gauges["disk_free"])])
    lines += _gauge("disk_total_bytes", "size of the data folder's disk", [((), gauges["disk_total"])])
    if gauges["backup_at"] is not None:
        age = (gauges["now"] - gauges["backup_at"]) / 1000
        lines += _gauge("backup_age_seconds", "time since the last successful backup", [((), age)])
    rules: dict[str, int] = {}
    for a in gauges["alerts"]:
        rules[a["rule"]] = rules.get(a["rule"], 0) + 1
    lines += _gauge("alerts_open", "alerts not acknowledged, by rule",
                    [((("rule", r),), n) for r, n in sorted(rules.items())] or [((), 0)])
    lines += _gauge("deliveries", "deliveries in the outbox, by state",
                    [((("state", s),), n) for s, n in sorted(gauges["deliveries"].items())])
    lines += _gauge("events_missed", "events the metrics lost by falling behind", [((), m.missed)])
    return "\n".join(lines) + "\n"


def _gauge(name: str, text: str, samples) -> list[str]:
    return [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} gauge",
            *(f"{PREFIX}{name}{_labels(labels)} {value:g}" for labels, value in samples)]


def _latency(m) -> list[str]:
    name = f"{PREFIX}request_seconds"
    lines = [f"# HELP {name} time the node's server took to handle a colleague's request, by route",
             f"# TYPE {name} histogram"]
    for route, row in sorted(m.latency.items()):
        running = 0.0
        for bound, n in zip(m.buckets, row):
            running += n
            lines.append(f'{name}_bucket{{route="{_escape(route)}",le="{bound:g}"}} {running:g}')
        lines.append(f'{name}_bucket{{route="{_escape(route)}",le="+Inf"}} {row[-1]:g}')
        lines.append(f'{name}_sum{{route="{_escape(route)}"}} {row[-2]:g}')
        lines.append(f'{name}_count{{route="{_escape(route)}"}} {row[-1]:g}')
    return lines


async def metrics(request: web.Request) -> web.Response:
    node = request.app[NODE]
    text = render(node, await node.gauges())
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


ROUTE = Route("GET", "/metrics", metrics, "the node's counters in the Prometheus text format", scope="admin",
              media="text/plain")


def mount(app: web.Application) -> None:
    """Add /metrics behind the API's gate (token scope `admin`, or a signed-in session)."""
    resource = app.router.add_route(ROUTE.method, ROUTE.path, ROUTE.handler).resource
    assert resource is not None
    app[ROUTE_SPECS][(ROUTE.method, resource.canonical)] = ROUTE
