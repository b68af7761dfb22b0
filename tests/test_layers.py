"""Dependencies point down the layers of DESIGN.md; this test fails when one points up.

    cli, node.py, serving, courier, intake   (wiring: may import everything)
    transport/                     (never imports store)
    store/, config                 (never imports transport)
    sync/, envelope, identity, consent, wire, crypto, errors   (pure: no I/O libraries)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PURE = {"node.core.errors", "node.core.wire", "node.core.crypto", "node.core.identity", "node.core.envelope", "node.core.consent"}
IO_LIBS = {"asyncio", "aiohttp", "sqlite3", "sqlite_utils", "zeroconf", "socket", "threading",
           "concurrent", "subprocess", "selectors"}
WIRING = {"node", "node.node", "node.app.serving", "node.app.courier", "node.app.intake", "node.app.discovery", "node.faces.cli",
          "node.__main__", "node.app.patients", "node.core.card", "node.faces.cli_patient"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports_of(path: Path) -> set[str]:
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return found


def sources():
    for folder in ("node", "bootstrap"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def layer(mod: str) -> str:
    if mod in WIRING:
        return "wiring"
    if mod in PURE or mod.startswith("node.sync"):
        return "pure"
    if mod.startswith("node.transport"):
        return "transport"
    if mod.startswith("node.store") or mod == "node.config":
        return "store"
    if mod.startswith("bootstrap"):
        return "bootstrap"
    return "other"


def violations() -> list[str]:
    bad = []
    for path in sources():
        mod = module_name(path)
        kind = layer(mod)
        for imp in imports_of(path):
            top = imp.split(".")[0]
            target = layer(imp) if imp.startswith(("node.", "bootstrap")) else None
            if kind == "pure" and (top in IO_LIBS or target in ("store", "transport", "wiring")):
                bad.append(f"{mod} (pure core) imports {imp}")
            if kind == "transport" and (target in ("store", "wiring") or top in ("sqlite3", "sqlite_utils")):
                bad.append(f"{mod} (transport) imports {imp}")
            if kind == "store" and (target in ("transport", "wiring") or top == "aiohttp"):
                bad.append(f"{mod} (store) imports {imp}")
            if kind == "bootstrap" and target in ("store", "wiring"):
                bad.append(f"{mod} (bootstrap) imports {imp}")
    return bad


def test_no_import_points_up_the_layers():
    assert violations() == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    # The rule must be able to fail: a pure module importing asyncio is caught.
    fake = ROOT / "node" / "sync" / "_layer_probe.py"
    fake.write_text("import asyncio\nfrom ..store import records\n")
    try:
        found = violations()
    finally:
        fake.unlink()
    assert "node.sync._layer_probe (pure core) imports asyncio" in found
    assert "node.sync._layer_probe (pure core) imports node.store.records" in found


def test_every_module_is_in_a_layer():
    assert [module_name(p) for p in sources() if layer(module_name(p)) == "other"] == []
