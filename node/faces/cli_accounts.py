"""`cabinet user add|list|remove` and `cabinet token add|list|revoke`: who may use the local API.

cli.build_parser calls `register(sub, add)`. The account's password is asked
twice on a terminal, or read from $CABINET_USER_PASSWORD (scripts); it is kept
only as an Argon2id hash. A token is printed once, here, and never again.
"""

from __future__ import annotations

import getpass
import os
import sys
import time

from .prompt import passphrase
from .text import shown
from ..node import ROLES, SCOPES, Node, UsageError


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _password() -> str:
    env = os.environ.get("CABINET_USER_PASSWORD")
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise UsageError("no password: set CABINET_USER_PASSWORD or run in a terminal")
    first = getpass.getpass("Password for the account: ")
    if getpass.getpass("Password again: ") != first:
        raise UsageError("the two passwords differ")
    return first


async def cmd_user_add(a) -> int:
    password = _password()
    async with Node.open(a.data, passphrase=passphrase()) as node:
        await node.accounts.add_user(a.name, a.role, password)
    print(f"Account {a.name} added ({a.role}).")
    return 0


async def cmd_user_list(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        rows = await node.accounts.users()
    if not rows:
        print("No accounts yet: 'cabinet user add NAME --role practitioner' adds one.")
    for r in rows:
        print(f"{shown(r['name']):24}  {r['role']:12}  created {_when(r['created'])}  last sign-in {_when(r['last_login'])}")
    return 0


async def cmd_user_remove(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        await node.accounts.remove_user(a.name)
    print(f"Account {a.name} removed; its sessions are ended.")
    return 0


async def cmd_token_add(a) -> int:
    scopes = [s for s in a.scope.split(",")]
    async with Node.open(a.data, passphrase=passphrase()) as node:
        value = await node.accounts.add_token(a.name, scopes)
    print(f"Token {a.name} ({','.join(sorted(set(s.strip() for s in scopes if s.strip())))}); shown this once, "
          "keep it like a password:", file=sys.stderr)
    print(value)
    return 0


async def cmd_token_list(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        rows = await node.accounts.tokens()
    if not rows:
        print("No API tokens: 'cabinet token add NAME --scope send,read' makes one.")
    for r in rows:
        print(f"{shown(r['name']):24}  {r['scopes']:28}  created {_when(r['created'])}  last used {_when(r['last_used'])}")
    return 0


async def cmd_token_revoke(a) -> int:
    async with Node.open(a.data, passphrase=passphrase()) as node:
        await node.accounts.revoke_token(a.name)
    print(f"Token {a.name} revoked: refused from now on.")
    return 0


def register(sub, add) -> None:
    user = sub.add_parser("user", help="accounts for the web app and local API").add_subparsers(
        dest="user_command", required=True, metavar="ACTION")
    sp = add("add", cmd_user_add, "add an account (asks for its password)", user)
    sp.add_argument("name")
    sp.add_argument("--role", required=True, choices=ROLES,
                    help="practitioner: everything; secretary: lists, sends, contacts, not letters or attachments")
    add("list", cmd_user_list, "list accounts", user)
    sp = add("remove", cmd_user_remove, "remove an account (ends its sessions)", user)
    sp.add_argument("name")

    token = sub.add_parser("token", help="API tokens for scripts and the EHR").add_subparsers(
        dest="token_command", required=True, metavar="ACTION")
    sp = add("add", cmd_token_add, "make a token (printed once)", token)
    sp.add_argument("name")
    sp.add_argument("--scope", required=True, help=f"comma-separated, some of: {','.join(SCOPES)}")
    add("list", cmd_token_list, "list tokens (name, scopes, created, last used)", token)
    sp = add("revoke", cmd_token_revoke, "revoke a token at once", token)
    sp.add_argument("name")
