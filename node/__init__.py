"""cabinet: end-to-end encrypted referrals between medical practices, peer to peer.

The public API is small: `Node` (open a practice's data folder, send, read,
reply, serve) and `CabinetError`, the base of every error it raises.
"""

from .core.errors import CabinetError
from .node import Node

__all__ = ["Node", "CabinetError"]
__version__ = "0.1.0"
