"""The bootstrap server: a public directory of signed node descriptors.

It stores only what nodes signed about themselves (keys, name, specialty,
city, RPPS, addresses), serves it by node ID and by search, and copies it
from peer bootstraps. It never receives a record. The API and the trust
argument are in docs/bootstrap.md. Run it with `python -m bootstrap`.
"""

from .server import Limits, make_app
from .service import Bootstrap
from .storage import Storage

__all__ = ["Bootstrap", "Limits", "Storage", "make_app"]
