"""cabinet: end-to-end encrypted referrals between medical practices, peer to peer.

The public API is small: `Node` (open a practice's data folder, send, read,
reply, serve) and `CabinetError`, the base of every error it raises.

`Node` is loaded on first use, so that `import node` stays light: a CLI
command answered by the running node through its control socket never loads
the facade (docs/cli.md).
"""

from typing import TYPE_CHECKING, Any

from .core.errors import CabinetError

if TYPE_CHECKING:
    from .node import Node

__all__ = ["Node", "CabinetError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Node":
        from .node import Node
        return Node
    raise AttributeError(f"module 'node' has no attribute {name!r}")
