"""The blind relay: `python -m relay --listen HOST:PORT`. Splices two nodes' TCP connections.

It imports only node.core.* of node/ (like bootstrap/), holds no key, writes
nothing to disk and keeps nothing about a session once it ends. See docs/relay.md.
"""
