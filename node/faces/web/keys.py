"""The application keys shared by the web modules (typed, as aiohttp wants)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ...node import Node

NODE = web.AppKey("node", Node)
TLS_ON = web.AppKey("tls", bool)
ALLOWED_HOSTS = web.AppKey("allowed_hosts", set)
ROUTE_SPECS = web.AppKey("route_specs", dict)
CLOSING = web.AppKey("closing", asyncio.Event)
