"""The import graph of node/, bootstrap/ and relay/: no cycles, no arrow pointing up the layers.

Layers, bottom to top (docs/architecture.md); a module imports its own layer and lower ones only:

    node.faces.*, node.__main__               faces: import only the facade (node, node.node) and other faces
    node, node.node                           facade
    node.app.*                                services
    node.store.*, node.config | node.transport.*   store | transport (never each other)
    node.sync.*                               pure (no I/O library)
    node.core.*                               pure (no I/O library)

bootstrap/ and relay/ are separate programs on top of node.core.* and import nothing else of node/
(nor each other).
Every import counts: inside functions, under `if TYPE_CHECKING:`, relative ones, and
`importlib.import_module("...")` with a literal name. The checker runs on any copy of the
tree, so the probes below show each rule catching its violation without touching the source.
"""

from __future__ import annotations

import ast
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("node", "bootstrap", "relay")

IO_LIBS = ("asyncio", "aiohttp", "sqlite3", "sqlite_utils", "zeroconf", "socket", "socketserver", "ssl",
           "select", "selectors", "threading", "_thread", "concurrent", "multiprocessing", "subprocess",
           "signal", "fcntl", "mmap", "http.client", "http.server", "urllib.request", "requests", "httpx",
           "aiofiles", "anyio", "trio", "uvloop")

# (prefix, layer); the longest matching prefix wins. A prefix "p" matches p and p.*.
LAYERS = (("node.core", "core"), ("node.logsetup", "core"), ("node.sync", "sync"), ("node.store", "store"), ("node.config", "store"),
          ("node.transport", "transport"), ("node.app", "services"), ("node.node", "facade"),
          ("node.__main__", "faces"), ("node.faces", "faces"), ("bootstrap", "bootstrap"), ("relay", "relay"))
RANK = {"core": 0, "sync": 1, "store": 2, "transport": 2, "services": 3, "facade": 4, "faces": 5}
PURE = {"core", "sync"}
FACADE_FOR_FACES = {"node", "node.node"}


def layer_of(mod: str) -> str | None:
    if mod == "node":
        return "facade"          # the package __init__: the public API
    best = None
    for prefix, name in LAYERS:
        if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, name)
    return best[1] if best else None


# --- the graph ----------------------------------------------------------------------------

@dataclass
class Import:
    target: str        # a project module (or package folder), or an outside dotted name
    line: int
    internal: bool


@dataclass
class Tree:
    root: Path
    files: dict[str, Path] = field(default_factory=dict)      # module -> file
    known: set[str] = field(default_factory=set)              # modules and package folders
    imports: dict[str, list[Import]] = field(default_factory=dict)

    def rel(self, mod: str) -> str:
        return self.files[mod].relative_to(self.root).as_posix()


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def resolve(tree: Tree, dotted: str) -> str | None:
    """The most specific project module or folder that `dotted` names, or None if outside."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in tree.known:
            return candidate
    return None


def raw_imports(path: Path, mod: str) -> list[tuple[str, list[str], int]]:
    """(base, names, line) for each import statement: `import a.b` is ("a.b", [], line)."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((base, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            found.append((node.args[0].value, [], node.lineno))
    return found


def _is_dynamic_import(call: ast.Call) -> bool:
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return (name in ("import_module", "__import__") and bool(call.args)
            and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str))


def build(root: Path) -> Tree:
    tree = Tree(root)
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            tree.files[module_name(root, path)] = path
        for sub in [root / folder, *sorted(p for p in (root / folder).rglob("*") if p.is_dir())]:
            if sub.name != "__pycache__":
                tree.known.add(".".join(sub.relative_to(root).parts))
    tree.known |= set(tree.files)
    for mod, path in tree.files.items():
        found = tree.imports.setdefault(mod, [])
        for base, names, line in raw_imports(path, mod):
            for dotted in [f"{base}.{n}" for n in names if n != "*"] or [base]:
                target = resolve(tree, dotted)
                if target is None:
                    found.append(Import(base, line, internal=False))      # the outside module itself
                elif target != mod:
                    found.append(Import(target, line, internal=True))
    return tree


# --- the rules ----------------------------------------------------------------------------

def cycles(tree: Tree) -> list[list[str]]:
    """One shortest cycle through each module that is on one; each cycle listed once."""
    edges = {m: sorted({i.target for i in imps if i.internal and i.target in tree.files})
             for m, imps in tree.imports.items()}
    seen, found = set(), []
    for start in sorted(edges):
        path = _shortest_path_back(edges, start)
        if path:
            turn = path.index(min(path))
            key = tuple(path[turn:] + path[:turn])
            if key not in seen:
                seen.add(key)
                found.append(list(key) + [key[0]])
    return found


def _shortest_path_back(edges: dict[str, list[str]], start: str) -> list[str] | None:
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        here = queue.popleft()
        for nxt in edges.get(here, []):
            if nxt == start:
                path = [here]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1]
            if nxt not in parent:
                parent[nxt] = here
                queue.append(nxt)
    return None


def rule_for(src: str, target: str) -> str | None:
    """Why `src` may not import the project module `target`, or None when it may."""
    mine, theirs = layer_of(src), layer_of(target)
    if mine in ("bootstrap", "relay"):
        if target.startswith("node") and theirs != "core":
            return f"{mine}/ imports only node.core.* of node/"
        if theirs in ("bootstrap", "relay") and theirs != mine:
            return f"{mine}/ never imports {theirs}/"
        return None
    if theirs in ("bootstrap", "relay"):
        return f"node/ never imports {theirs}/"
    if mine == "faces":
        if target in FACADE_FOR_FACES or theirs == "faces":
            return None
        return "faces import only the facade (node, node.node) and other faces"
    if mine is None or theirs is None:
        return None              # reported as a module in no layer
    if RANK[theirs] > RANK[mine]:
        return f"upward import ({mine} -> {theirs})"
    if RANK[theirs] == RANK[mine] and theirs != mine:
        return f"{mine} and {theirs} never import each other"
    return None


def violations(root: Path) -> list[str]:
    tree = build(root)
    bad = [f"cycle: {' -> '.join(c)}" for c in cycles(tree)]
    for mod in sorted(tree.files):
        mine = layer_of(mod)
        if mine is None:
            bad.append(f"{tree.rel(mod)}: {mod} is in no layer")
        reported = set()
        for imp in tree.imports[mod]:
            if imp.internal:
                why = rule_for(mod, imp.target)
            elif mine in PURE and any(imp.target == lib or imp.target.startswith(lib + ".") for lib in IO_LIBS):
                why = f"a pure {mine} module imports an I/O library"
            else:
                why = None
            if why and imp.target not in reported:
                reported.add(imp.target)
                bad.append(f"{tree.rel(mod)}:{imp.line}: {mod} imports {imp.target}: {why}")
    return bad


# --- the real tree ------------------------------------------------------------------------

def test_the_source_tree_keeps_its_layers():
    found = violations(ROOT)
    assert not found, "\n" + "\n".join(found)


# --- probes, written into a copy of the tree ----------------------------------------------

def copy_of_tree(tmp_path: Path) -> Path:
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def new_violations(root: Path, probes: dict[str, str]) -> set[str]:
    before = set(violations(root))
    for rel, text in probes.items():
        write(root, rel, text)
    return set(violations(root)) - before


def test_probe_cycle_through_a_function_level_import(tmp_path):
    root = copy_of_tree(tmp_path)
    found = new_violations(root, {
        "node/sync/_probe_a.py": "from . import _probe_b\n",
        "node/sync/_probe_b.py": "def late():\n    from ._probe_a import something\n    return something\n",
    })
    assert found == {"cycle: node.sync._probe_a -> node.sync._probe_b -> node.sync._probe_a"}


def test_probe_cycle_under_type_checking_across_three_modules(tmp_path):
    root = copy_of_tree(tmp_path)
    found = new_violations(root, {
        "node/app/_probe_x.py": "import node.app._probe_y\n",
        "node/app/_probe_y.py": "from node.app import _probe_z\n",
        "node/app/_probe_z.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from ._probe_x import Thing\n"),
    })
    assert found == {"cycle: node.app._probe_x -> node.app._probe_y -> node.app._probe_z -> node.app._probe_x"}


def test_a_package_importing_its_submodules_is_no_cycle_but_importing_back_is(tmp_path):
    root = copy_of_tree(tmp_path)
    fine = new_violations(root, {
        "node/core/_probe_pkg/__init__.py": "from .child import VALUE\nfrom . import sibling\n",
        "node/core/_probe_pkg/child.py": "from . import sibling\nVALUE = sibling.X\n",
        "node/core/_probe_pkg/sibling.py": "X = 1\n",
    })
    assert fine == set()
    back = new_violations(root, {"node/core/_probe_pkg/sibling.py": "from . import VALUE\nX = 1\n"})
    assert back == {"cycle: node.core._probe_pkg -> node.core._probe_pkg.sibling -> node.core._probe_pkg",
                    "cycle: node.core._probe_pkg -> node.core._probe_pkg.child -> node.core._probe_pkg.sibling"
                    " -> node.core._probe_pkg"}


def test_probe_upward_imports(tmp_path):
    root = copy_of_tree(tmp_path)
    found = new_violations(root, {
        "node/core/_probe_up.py": "def f():\n    from ..sync import _probe_low\n",
        "node/sync/_probe_low.py": "import node.store\n",
        "node/store/_probe_mid.py": "from node import app\n",
        "node/app/_probe_hi.py": "from .. import node as facade\nimport node.faces\n",
    })
    assert found == {
        "node/core/_probe_up.py:2: node.core._probe_up imports node.sync._probe_low: upward import (core -> sync)",
        "node/sync/_probe_low.py:1: node.sync._probe_low imports node.store: upward import (sync -> store)",
        "node/store/_probe_mid.py:1: node.store._probe_mid imports node.app: upward import (store -> services)",
        "node/app/_probe_hi.py:1: node.app._probe_hi imports node.node: upward import (services -> facade)",
        "node/app/_probe_hi.py:2: node.app._probe_hi imports node.faces: upward import (services -> faces)",
    }


def test_probe_store_and_transport_never_import_each_other(tmp_path):
    root = copy_of_tree(tmp_path)
    found = new_violations(root, {
        "node/store/_probe_s.py": "from ..transport import _probe_t\n",
        "node/transport/_probe_t.py": "import node.config\n",
    })
    assert found == {
        "node/store/_probe_s.py:1: node.store._probe_s imports node.transport._probe_t: "
        "store and transport never import each other",
        "node/transport/_probe_t.py:1: node.transport._probe_t imports node.config: "
        "transport and store never import each other",
    }


def test_probe_pure_modules_import_no_io_library(tmp_path):
    root = copy_of_tree(tmp_path)
    found = new_violations(root, {
        "node/core/_probe_io.py": ("import json\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    import asyncio\n"),
        "node/sync/_probe_io.py": ("def f():\n    from concurrent.futures import ThreadPoolExecutor\n"
                                   "    return __import__('sqlite3')\n"),
        "node/store/_probe_io.py": "import asyncio\nimport sqlite3\n",     # I/O is the store's job
    })
    assert found == {
        "node/core/_probe_io.py:4: node.core._probe_io imports asyncio: a pure core module imports an I/O library",
        "node/sync/_probe_io.py:2: node.sync._probe_io imports concurrent.futures: "
        "a pure sync module imports an I/O library",
        "node/sync/_probe_io.py:3: node.sync._probe_io imports sqlite3: a pure sync module imports an I/O library",
    }


def test_probe_faces_import_only_the_facade(tmp_path):
    root = copy_of_tree(tmp_path)
    found = new_violations(root, {
        "node/faces/_probe_face.py": ("from node import Node\nfrom node.node import Node as N\n"
                                      "from . import _probe_other\nfrom node.store import _probe_db\n"
                                      "import node.core.errors\n"),
        "node/faces/_probe_other.py": "",
        "node/store/_probe_db.py": "",
    })
    why = "faces import only the facade (node, node.node) and other faces"
    assert found == {
        f"node/faces/_probe_face.py:4: node.faces._probe_face imports node.store._probe_db: {why}",
        f"node/faces/_probe_face.py:5: node.faces._probe_face imports node.core.errors: {why}",
    }


def test_probe_bootstrap_imports_only_the_core(tmp_path):
    root = copy_of_tree(tmp_path)
    found = new_violations(root, {
        "bootstrap/_probe_boot.py": ("import asyncio\nfrom node.core import _probe_codec\nfrom . import _probe_peer\n"
                                     "from node.transport import _probe_dir\n"),
        "bootstrap/_probe_peer.py": "",
        "node/core/_probe_codec.py": "",
        "node/transport/_probe_dir.py": "",
        "node/store/_probe_boot_user.py": "import bootstrap._probe_peer\n",
    })
    assert found == {
        "bootstrap/_probe_boot.py:4: bootstrap._probe_boot imports node.transport._probe_dir: "
        "bootstrap/ imports only node.core.* of node/",
        "node/store/_probe_boot_user.py:1: node.store._probe_boot_user imports bootstrap._probe_peer: "
        "node/ never imports bootstrap/",
    }


def test_probe_a_module_outside_every_layer(tmp_path):
    root = copy_of_tree(tmp_path)
    found = new_violations(root, {"node/_probe_stray.py": "", "node/misc/_probe_stray.py": ""})
    assert found == {"node/_probe_stray.py: node._probe_stray is in no layer",
                     "node/misc/_probe_stray.py: node.misc._probe_stray is in no layer"}


def test_the_probes_left_the_source_tree_alone():
    assert not [p for folder in FOLDERS for p in (ROOT / folder).rglob("_probe*")]


def test_probe_relay_imports_only_the_core(tmp_path):
    root = copy_of_tree(tmp_path)
    found = new_violations(root, {
        "relay/_probe_relay.py": "from node.core import errors\nfrom node.transport import client\n",
        "node/app/_probe_relay_user.py": "import relay\n",
    })
    assert found == {
        "relay/_probe_relay.py:2: relay._probe_relay imports node.transport.client: relay/ imports only node.core.* of node/",
        "node/app/_probe_relay_user.py:1: node.app._probe_relay_user imports relay: node/ never imports relay/",
    }
