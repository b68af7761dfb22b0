"""Accounts, API tokens and sessions: stored as hashes only, roles and scopes, expiry; `cabinet user|token`."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PASSPHRASE, base_env, cli as plain_cli, ok
from node import Node
from node.node import AlreadyExists, AuthenticationFailed, NotFound, Principal, UsageError

PASSWORD = "a long enough password"

def cli(data, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cabinet user|token ...` as a real subprocess."""
    return plain_cli(data, *args, env=env)


@pytest.fixture
async def node(tmp_path):
    await Node.init(tmp_path / "n", PASSPHRASE, name="Dr Anne Martin")
    n = await Node.open_node(tmp_path / "n", passphrase=PASSPHRASE)
    yield n
    await n.close()


def db_bytes(node: Node) -> bytes:
    return b"".join(p.read_bytes() for p in node.folder.glob("cabinet.db*"))


async def test_passwords_and_tokens_are_stored_as_hashes_only(node):
    await node.accounts.add_user("anne", "practitioner", PASSWORD)
    token = await node.accounts.add_token("ehr", ["send", "read"])
    assert token.startswith("cab_") and len(token) == 4 + 43
    row = await node.store.call(lambda db: db.conn.execute("SELECT pw_hash FROM accounts").fetchone())
    assert row[0].startswith(b"$argon2id$")
    raw = db_bytes(node)
    assert PASSWORD.encode() not in raw and token.encode() not in raw and token[4:].encode() not in raw
    who = await node.accounts.by_token(token)
    assert who == Principal("token:ehr", "token", "token", frozenset({"send", "read"}))
    assert who.may("send") and who.may("read", letters=True) and not who.may("contacts")
    [listed] = await node.accounts.tokens()
    assert listed["name"] == "ehr" and listed["scopes"] == "read,send" and listed["last_used"]


async def test_bad_input_is_refused_with_one_line(node):
    acc = node.accounts
    for args, message in ((("anne", "doctor", PASSWORD), "role"), (("anne", "secretary", "short"), "too short"),
                          (("bad name!", "secretary", PASSWORD), "account name")):
        with pytest.raises(UsageError, match=message):
            await acc.add_user(*args)
    await acc.add_user("anne", "secretary", PASSWORD)
    with pytest.raises(AlreadyExists):
        await acc.add_user("ANNE", "practitioner", PASSWORD)
    with pytest.raises(UsageError, match="scopes"):
        await acc.add_token("t", ["send", "everything"])
    with pytest.raises(UsageError, match="scopes"):
        await acc.add_token("t", [])
    with pytest.raises(NotFound):
        await acc.revoke_token("never-made")
    with pytest.raises(NotFound):
        await acc.remove_user("nobody")


async def test_roles_sessions_expire_and_removal_ends_them(node):
    acc = node.accounts
    now = [10**12]
    acc.clock = lambda: now[0]
    await acc.add_user("claire", "secretary", PASSWORD)
    sid, me = await acc.sign_in("claire", PASSWORD, "127.0.0.1")
    assert me.may("send") and me.may("contacts") and not me.may("read", letters=True)
    assert (await acc.by_session(sid)).account == "claire"
    assert await acc.by_session(sid + "x") is None
    now[0] += acc.idle_ms - 1000
    assert await acc.by_session(sid) is not None            # in use: the idle clock restarts
    now[0] += acc.idle_ms - 1000
    assert await acc.by_session(sid) is not None
    now[0] += acc.idle_ms + 1
    assert await acc.by_session(sid) is None                # idle too long: ended for good
    now[0] += 1
    assert await acc.by_session(sid) is None

    sid, _ = await acc.sign_in("claire", PASSWORD, "127.0.0.1")
    for _ in range(acc.absolute_ms // (acc.idle_ms // 2) + 1):
        now[0] += acc.idle_ms // 2
        if await acc.by_session(sid) is None:
            break
    assert await acc.by_session(sid) is None, "ends after the absolute limit even when in use"

    sid, _ = await acc.sign_in("claire", PASSWORD, "127.0.0.1")
    await acc.remove_user("claire")
    assert await acc.by_session(sid) is None
    with pytest.raises(AuthenticationFailed):
        await acc.sign_in("claire", PASSWORD, "127.0.0.2")

    events = await node.store.call(lambda db: list(db.query("SELECT event, detail FROM audit WHERE detail LIKE '{%'")))
    names = [e["event"] for e in events]
    assert names[:2] == ["account-added", "signed-in"] and "session-expired" in names and "account-removed" in names
    assert all(json.loads(e["detail"])["account"] == "claire" for e in events)


def test_cli_user_and_token_commands(tmp_path):
    data = tmp_path / "n"
    ok(cli(data, "init", "--name", "Dr Anne Martin"))
    env = base_env(CABINET_USER_PASSWORD=PASSWORD)
    out = ok(cli(data, "user", "add", "anne", "--role", "practitioner", env=env))
    assert "anne" in out and "practitioner" in out
    bad = cli(data, "user", "add", "bob", "--role", "secretary", env=base_env(CABINET_USER_PASSWORD="short"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "too short" in bad.stderr
    nopw = cli(data, "user", "add", "bob", "--role", "secretary")
    assert nopw.returncode == 2 and "CABINET_USER_PASSWORD" in nopw.stderr
    assert "anne" in ok(cli(data, "user", "list"))

    made = cli(data, "token", "add", "ehr", "--scope", "send,read")
    token = ok(made).strip()
    assert token.startswith("cab_") and "once" in made.stderr
    listing = ok(cli(data, "token", "list"))
    assert "ehr" in listing and "read,send" in listing and token not in listing
    assert cli(data, "token", "add", "x", "--scope", "root").returncode == 2
    ok(cli(data, "token", "revoke", "ehr"))
    gone = cli(data, "token", "revoke", "ehr")
    assert gone.returncode == 2 and "no token" in gone.stderr
    ok(cli(data, "user", "remove", "anne"))
    assert "No accounts" in ok(cli(data, "user", "list"))
    log = (data / "node.log").read_text("utf-8") if (data / "node.log").exists() else ""
    assert PASSWORD not in log and token not in log
