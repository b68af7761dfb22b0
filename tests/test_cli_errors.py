"""Bad input at the CLI: one line on stderr that names the problem, a non-zero exit,
never a traceback, and nothing already stored is lost.

Every check runs `python -m node` as a real subprocess. To keep the file fast,
one pair of running practices (a GP and a cardiologist who know each other) and
one stopped practice with no contacts are shared by the whole module; a check that
needs to damage a data folder works on a copy of its own.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import ssl
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import NodeProc, base_env, cli, free_port, introduce, ok
from node.core import envelope

LETTER = "Cher confrère,\nje vous adresse M. Pierre Roux pour un souffle systolique.\n"
GP, CARDIO = "Dr Anne Martin", "Dr Paul Durand"


# --- helpers -------------------------------------------------------------------

def refused(proc, *keywords: str | tuple[str, ...], code: int | None = None) -> str:
    """The CLI refused: non-zero exit, one 'cabinet: ...' line naming the problem, no traceback."""
    shown = f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}"
    assert proc.returncode != 0, shown
    if code is not None:
        assert proc.returncode == code, shown
    assert "Traceback" not in proc.stdout and "Traceback" not in proc.stderr, shown
    err = proc.stderr.strip()
    assert err, shown
    assert err.count("\n") == 0, f"more than one line on stderr\n{shown}"
    assert err.startswith("cabinet: "), shown
    assert "internal error" not in err, shown
    for word in keywords:                  # a tuple: any one of these words
        options = (word,) if isinstance(word, str) else word
        assert any(w.lower() in err.lower() for w in options), f"{word!r} not in the message\n{shown}"
    return err


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Name -> SHA-256 of the files that hold a practice's state at rest."""
    return {p.name: digest(p) for p in sorted(folder.iterdir()) if p.name in ("keys.cabinet", "config.json")}


def record_id(out: str) -> str:
    m = re.search(r"(?:Record|Reply) ([0-9a-f]{32})", out)
    assert m, out
    return m.group(1)


def no_passphrase_env() -> dict[str, str]:
    env = base_env()
    env.pop("CABINET_PASSPHRASE")
    return env


def outbox_line(node: NodeProc, rid: str) -> str:
    lines = [l for l in node.ok("outbox").splitlines() if l.startswith(rid[:10])]
    assert len(lines) == 1, lines
    return lines[0]


# --- shared practices ------------------------------------------------------------

@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """A running GP and cardiologist who know each other, and a stopped practice with no contacts."""
    root = tmp_path_factory.mktemp("cli_errors")
    gp = NodeProc(root / "gp", GP, free_port()).init(specialty="general practice", city="Lyon")
    cardio = NodeProc(root / "cardio", CARDIO, free_port()).init(specialty="cardiology", city="Lyon")
    solo = NodeProc(root / "solo", "Dr Claire Petit", free_port()).init(city="Bron")
    introduce(gp, cardio)
    gp.start()
    cardio.start()
    files = root / "files"
    files.mkdir()
    nodes = {"gp": gp, "cardio": cardio, "solo": solo, "files": files, "root": root}
    yield nodes
    for n in (gp, cardio, solo):
        if n.proc is not None:
            n.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def letter(net) -> Path:
    return write(net["files"] / "letter.txt", LETTER)


@pytest.fixture(scope="module")
def delivered(net, letter):
    """One referral with an attachment 'x.pdf', delivered from the GP to the cardiologist."""
    att = write(net["files"] / "x.pdf", b"%PDF-1.4 the sender's scan\n" + os.urandom(2000))
    out = net["gp"].ok("send", "--to", CARDIO, "--patient", "Pierre Roux", "--born", "1950-01-01",
                       "--subject", "Souffle", "--letter", str(letter), str(att))
    assert "delivered" in out, out
    return record_id(out), att.read_bytes()


# --- passphrase and data folder ------------------------------------------------------

def test_wrong_passphrase_is_named_and_the_folder_still_opens(net):
    solo = net["solo"]
    before = snapshot(solo.data)
    err = refused(solo.cli("contact", "list", env=base_env(CABINET_PASSPHRASE="wrong horse battery")),
                  "passphrase")
    assert "wrong" in err.lower()
    assert snapshot(solo.data) == before
    assert "No contacts yet" in solo.ok("contact", "list")


def test_no_passphrase_and_no_terminal(net):
    solo = net["solo"]
    refused(solo.cli("contact", "list", env=no_passphrase_env(), input=""), "CABINET_PASSPHRASE", "terminal")
    # init too asks for it before anything is created
    folder = net["root"] / "never-made"
    refused(cli(folder, "init", "--name", "Dr X", env=no_passphrase_env(), input=""), "passphrase")
    assert not (folder / "keys.cabinet").exists()


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_command_on_a_folder_with_no_node(net, how):
    folder = net["root"] / f"no-node-{how}"
    if how == "empty":
        folder.mkdir()
    refused(cli(folder, "inbox"), "no cabinet node", "init")
    refused(cli(folder, "run", timeout=20), "no cabinet node")
    assert not (folder / "keys.cabinet").exists() and not (folder / "cabinet.db").exists()


def test_init_twice_is_refused_and_keeps_the_key_file(net):
    solo = net["solo"]
    before = snapshot(solo.data)
    refused(solo.cli("init", "--name", "Dr Someone Else"), "already exists")
    refused(solo.cli("init", "--name", "Dr Someone Else", env=base_env(CABINET_PASSPHRASE="another passphrase")),
            "already exists")
    assert snapshot(solo.data) == before
    assert solo.node_id in solo.ok("id")


def test_passphrase_too_short_at_init_leaves_no_half_node(net):
    folder = net["root"] / "short"
    refused(cli(folder, "init", "--name", "Dr Short", env=base_env(CABINET_PASSPHRASE="abc")),
            "passphrase", "too short", "8")
    assert not (folder / "keys.cabinet").exists()
    # the same folder can then be initialised properly
    out = ok(cli(folder, "init", "--name", "Dr Short"))
    assert "Node ID:" in out


# --- send --------------------------------------------------------------------------

def _blob_files(node: NodeProc) -> list[str]:
    return sorted(str(p.relative_to(node.data)) for p in node.data.rglob("*")
                  if p.is_file() and "blob" in str(p.relative_to(node.data)))


def _unchanged_after(node: NodeProc, run_refused, *lists: tuple[str, ...]) -> None:
    """Run a refused send; the outbox (and any other listing given) and the stored blobs are unchanged."""
    lists = (("outbox",), *lists)
    before, blobs = [node.ok(*args) for args in lists], _blob_files(node)
    run_refused()
    assert [node.ok(*args) for args in lists] == before
    assert _blob_files(node) == blobs


def test_send_to_an_unknown_contact(net, letter):
    gp = net["gp"]
    _unchanged_after(gp, lambda: refused(
        gp.cli("send", "--to", "Dr Nobody", "--patient", "Pierre Roux", "--letter", str(letter)),
        "unknown contact", "Dr Nobody"))


def test_send_with_a_missing_letter(net):
    gp = net["gp"]
    missing = net["files"] / "no-such-letter.txt"
    _unchanged_after(gp, lambda: refused(
        gp.cli("send", "--to", CARDIO, "--patient", "Pierre Roux", "--letter", str(missing)),
        "letter", "not found", "no-such-letter.txt"))


def test_send_with_a_missing_attachment(net, letter):
    gp = net["gp"]
    missing = net["files"] / "no-such-scan.pdf"
    _unchanged_after(gp, lambda: refused(
        gp.cli("send", "--to", CARDIO, "--patient", "Pierre Roux", "--letter", str(letter), str(missing)),
        "attachment", "not found", "no-such-scan.pdf"))


def test_send_with_a_directory_as_attachment(net, letter):
    gp = net["gp"]
    folder = net["files"] / "a-folder"
    folder.mkdir(exist_ok=True)
    _unchanged_after(gp, lambda: refused(
        gp.cli("send", "--to", CARDIO, "--patient", "Pierre Roux", "--letter", str(letter), str(folder)),
        "attachment", "not a file", "a-folder"))


def test_send_with_an_attachment_over_the_limit(net, letter):
    gp, cardio = net["gp"], net["cardio"]
    big = net["files"] / "huge-scan.dcm"
    with open(big, "wb"):
        pass
    os.truncate(big, envelope.MAX_ATTACHMENT + 1)       # sparse: no 4 GiB is written
    try:
        assert big.stat().st_size == envelope.MAX_ATTACHMENT + 1
        cardio_inbox = cardio.ok("inbox", "--all")
        _unchanged_after(gp, lambda: refused(
            gp.cli("send", "--to", CARDIO, "--patient", "Pierre Roux", "--letter", str(letter), str(big)),
            "huge-scan.dcm", f"{envelope.MAX_ATTACHMENT // 2**30} GiB", "limit"), ("inbox", "--all"))
        assert cardio.ok("inbox", "--all") == cardio_inbox
        # nothing half-sealed left behind either
        assert not [p for p in gp.data.rglob("*.sealing")]
    finally:
        big.unlink()


# --- an unreachable colleague ----------------------------------------------------------

def test_unreachable_colleague_queues_then_delivers_once(net, letter):
    gp, cardio = net["gp"], net["cardio"]
    cardio.stop()
    try:
        sent = gp.cli("send", "--to", CARDIO, "--patient", "Louise Blanc", "--born", "1947-07-07",
                      "--subject", "Palpitations", "--letter", str(letter))
        out = ok(sent)
        assert "Traceback" not in sent.stderr
        rid = record_id(out)
        assert re.search(rf"to {CARDIO} \({re.escape(cardio.node_id)}\): queued \(.+\)", out), out
        line = outbox_line(gp, rid)
        assert "queued" in line and "attempt" in line, line
        assert re.search(r"queued, \d+ attempt\(s\), next try .+: \S", line), line   # the error is shown
    finally:
        cardio.start()
    # the running GP node's courier retries with backoff (base delay 2 s)
    deadline = time.monotonic() + 30
    while "delivered" not in (line := outbox_line(gp, rid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "delivered" in line, line
    inbox = cardio.ok("inbox")
    assert inbox.count(rid[:10]) == 1, inbox
    assert "Louise Blanc" in inbox


# --- contact add -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def cardio_descriptor(net) -> str:
    return next(l for l in net["cardio"].ok("id").splitlines() if l.startswith("cabinet-descriptor:"))


def _contacts(node: NodeProc) -> str:
    return node.ok("contact", "list")


@pytest.mark.parametrize("garbage", ["hello world, this is not a descriptor",
                                     "cabinet-descriptor:",
                                     "cabinet-descriptor:AAAA",
                                     "cabinet-descriptor:!!!not base64!!!",
                                     "cabinet-descriptor:" + "A" * 500])
def test_contact_add_garbage_text(net, garbage):
    solo = net["solo"]
    before = _contacts(solo)
    refused(solo.cli("contact", "add", garbage), "descriptor")
    assert _contacts(solo) == before


def test_contact_add_tampered_descriptor(net, cardio_descriptor):
    solo = net["solo"]
    before = _contacts(solo)
    prefix, payload = cardio_descriptor.split(":", 1)
    # one character changed in several places: the name, the keys, the signature
    for pos in (len(payload) // 3, len(payload) // 2, len(payload) - 10):
        swapped = "B" if payload[pos] != "B" else "C"
        tampered = f"{prefix}:{payload[:pos]}{swapped}{payload[pos + 1:]}"
        assert tampered != cardio_descriptor
        refused(solo.cli("contact", "add", tampered), ("descriptor", "signature"))
    assert _contacts(solo) == before
    assert CARDIO not in _contacts(solo)


def test_contact_add_http_without_id(net):
    solo, cardio = net["solo"], net["cardio"]
    before = _contacts(solo)
    refused(solo.cli("contact", "add", cardio.url), "--id")
    assert _contacts(solo) == before


def test_contact_add_http_with_the_wrong_id(net):
    solo, gp, cardio = net["solo"], net["gp"], net["cardio"]
    before = _contacts(solo)
    refused(solo.cli("contact", "add", cardio.url, "--id", gp.node_id), "expected", gp.node_id)
    assert _contacts(solo) == before
    assert CARDIO not in _contacts(solo)


def test_contact_add_with_a_mistyped_node_id(net, cardio_descriptor):
    solo, cardio = net["solo"], net["cardio"]
    before = _contacts(solo)
    i = 5                                   # a letter in the second group
    wrong = "A" if cardio.node_id[i] != "A" else "B"
    typo = cardio.node_id[:i] + wrong + cardio.node_id[i + 1:]
    for source in (cardio_descriptor, cardio.url):
        refused(solo.cli("contact", "add", source, "--id", typo), "check character", "typo")
    assert _contacts(solo) == before


def test_contact_add_from_a_nonexistent_file(net):
    solo = net["solo"]
    before = _contacts(solo)
    refused(solo.cli("contact", "add", str(net["files"] / "nobody.descriptor")), "no such file", "nobody.descriptor")
    assert _contacts(solo) == before


def test_contact_add_from_an_unreachable_address(net):
    solo, cardio = net["solo"], net["cardio"]
    before = _contacts(solo)
    address = f"http://127.0.0.1:{free_port()}"
    refused(solo.cli("contact", "add", address, "--id", cardio.node_id), "cannot reach", address)
    assert _contacts(solo) == before


# --- show and export ---------------------------------------------------------------------

@pytest.mark.parametrize("command", ["show", "export"])
def test_unknown_and_too_short_record_ids(net, delivered, command):
    cardio = net["cardio"]
    rid, _ = delivered
    unknown = "0123456789abcdef" if not rid.startswith("0123456789abcdef") else "fedcba9876543210"
    extra = [str(net["files"] / "out-unknown")] if command == "export" else []
    refused(cardio.cli(command, unknown, *extra), "no record", unknown)
    refused(cardio.cli(command, rid[:4], *extra), "at least 6")
    refused(cardio.cli(command, "not-hex!", *extra), "no record")
    assert rid[:10] in cardio.ok("inbox")


def test_export_never_overwrites_an_existing_file(net, delivered):
    cardio = net["cardio"]
    rid, content = delivered
    dest = net["files"] / "export-here"
    dest.mkdir()
    mine = write(dest / "x.pdf", b"the practice's own file, not to be touched\n")
    out = cardio.ok("export", rid[:10], str(dest))
    assert mine.read_bytes() == b"the practice's own file, not to be touched\n"
    assert (dest / "x (2).pdf").read_bytes() == content
    assert str(dest / "x (2).pdf") in out
    # and again: a third name, both earlier files untouched
    cardio.ok("export", rid[:10], str(dest))
    assert mine.read_bytes() == b"the practice's own file, not to be touched\n"
    assert (dest / "x (2).pdf").read_bytes() == content
    assert (dest / "x (3).pdf").read_bytes() == content
    assert sorted(p.name for p in dest.iterdir()) == ["x (2).pdf", "x (3).pdf", "x.pdf"]


# --- a damaged data folder --------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(net) -> Path:
    """A stopped practice folder to copy and damage (the shared one is never damaged)."""
    node = NodeProc(net["root"] / "pristine", "Dr Damaged", free_port()).init()
    return node.data


def _copy(pristine: Path, name: str) -> Path:
    dest = pristine.parent / name
    shutil.copytree(pristine, dest)
    return dest


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_key_file(net, pristine, damage):
    folder = _copy(pristine, f"bad-keys-{damage}")
    kf = folder / "keys.cabinet"
    raw = kf.read_bytes()
    kf.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": os.urandom(len(raw)), "empty": b""}[damage])
    before = digest(kf)
    for args in (("inbox",), ("id",)):
        refused(cli(folder, *args), "damaged")
    refused(cli(folder, "init", "--name", "Dr Again"), "already exists")
    assert digest(kf) == before                       # nothing rewrote or removed it


def test_damaged_database(net, pristine):
    folder = _copy(pristine, "bad-db")
    db = folder / "cabinet.db"
    for extra in ("cabinet.db-wal", "cabinet.db-shm"):
        (folder / extra).unlink(missing_ok=True)
    db.write_bytes(b"this is not an SQLite database at all\n" * 200)
    before = digest(db)
    for args in (("inbox",), ("outbox",), ("contact", "list")):
        refused(cli(folder, *args), "damaged", "cabinet.db")
    assert digest(db) == before                       # not replaced by a fresh, empty database


# --- run -----------------------------------------------------------------------------

def test_run_twice_on_the_same_folder(net):
    gp = net["gp"]
    before = snapshot(gp.data)
    second = gp.cli("run", timeout=20)
    refused(second, "already running")
    assert gp.proc is not None and gp.proc.poll() is None, "the first node stopped"
    assert gp.node_id in gp.ok("id")
    assert snapshot(gp.data) == before                # the second did not re-advertise or rewrite config
    # and the first one still serves
    public = ssl.create_default_context()
    public.check_hostname, public.verify_mode = False, ssl.CERT_NONE     # the descriptor is public and signed
    with urllib.request.urlopen(gp.url.replace("http://", "https://") + "/v1/descriptor", timeout=10,
                                context=public) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:99999", ":7400"])
def test_malformed_listen(net, listen):
    solo = net["solo"]
    before = snapshot(solo.data)
    refused(solo.cli("run", "--listen", listen, timeout=20), "--listen", "HOST:PORT")
    assert snapshot(solo.data) == before
    folder = net["root"] / f"listen-{abs(hash(listen))}"
    refused(cli(folder, "init", "--name", "Dr Listen", "--listen", listen), "--listen", "HOST:PORT")
    assert not (folder / "keys.cabinet").exists()
