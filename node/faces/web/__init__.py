"""The practice's local JSON API (and, later, its web pages): served by `cabinet run` on a port of its own.

server.py builds the aiohttp app and `start_web`; auth.py says who is calling; api.py holds the
route table and its handlers; upload.py streams multipart uploads to disk; stream.py serves the
event stream; openapi.py describes every route. See docs/api.md.
"""
