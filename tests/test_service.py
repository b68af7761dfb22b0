"""`cabinet service install|uninstall` (issue 12): the systemd unit, checked by systemd-analyze itself;
the passphrase from a systemd credential; the node working under MemoryDenyWriteExecute.

systemd-analyze must be installed (Debian: apt-get install systemd); without it the test fails
with one line saying so rather than skipping.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys

import pytest

from conftest import PASSPHRASE, base_env, cli, ok, wait_for

from node.app import service


def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze is not installed: apt-get install systemd (the unit must be checked by systemd)")
    return exe


def verify(unit_file) -> None:
    """systemd-analyze verify: exit 0 and not one warning about our unit."""
    done = subprocess.run([analyze(), "verify", str(unit_file)], capture_output=True, text=True, timeout=60)
    ours = [line for line in done.stderr.splitlines() if unit_file.name in line or str(unit_file) in line]
    assert done.returncode == 0 and not ours, f"systemd-analyze verify: exit {done.returncode}\n{done.stderr}"


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, proc.stderr
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def box(tmp_path):
    data = tmp_path / "srv" / "cabinet"
    ok(cli(data, "init", "--name", "Dr Anne Martin", "--listen", "127.0.0.1:7400"))
    return data


def test_systemd_analyze_catches_a_broken_unit(tmp_path):
    """The check below can fail: a bad boolean and a missing program are reported."""
    bad = tmp_path / "cabinet.service"
    bad.write_text("[Service]\nExecStart=/nonexistent/cabinet run\nNoNewPrivileges=maybe\n")
    done = subprocess.run([analyze(), "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Failed to parse boolean" in done.stderr


@pytest.mark.parametrize("source", ["web", "credential", "plain-credential"])
def test_every_unit_the_command_prints_passes_systemd_analyze_verify(box, tmp_path, source):
    text = ok(cli(box, "service", "install", "--print", "--passphrase-from", source, "--web", "127.0.0.1:7481"))
    unit = tmp_path / "cabinet.service"
    unit.write_text(text)
    verify(unit)
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["User"] == "cabinet" and settings["Restart"] == "on-failure"
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                       ("ProtectHome", "yes"), ("ReadWritePaths", str(box)), ("CapabilityBoundingSet", ""),
                       ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX AF_NETLINK"),
                       ("LockPersonality", "yes"), ("MemoryDenyWriteExecute", "yes"),
                       ("SystemCallFilter", "@system-service")):
        assert settings[key] == value, (key, settings.get(key))
    start = settings["ExecStart"].split()
    assert start[:3] == [sys.executable, "-m", "node"] and start[3:6] == ["run", "--data", str(box)]
    assert ("--locked" in start) == (source == "web") and "--web" in start and "127.0.0.1:7481" in start
    assert ("LoadCredentialEncrypted" in settings) == (source == "credential")
    assert ("LoadCredential" in settings) == (source == "plain-credential")
    if source == "credential":
        assert settings["LoadCredentialEncrypted"] == "cabinet-passphrase:/etc/credstore.encrypted/cabinet-passphrase"


def test_a_data_folder_under_home_gets_a_read_only_home_and_odd_paths_are_quoted(tmp_path):
    text = service.unit_text(service.UnitSpec(command=(sys.executable, "-m", "node"), data="/home/it/my data/50%",
                                              user="cabinet"))
    assert "ProtectHome=read-only" in text.splitlines()
    assert 'ReadWritePaths="/home/it/my data/50%%"' in text.splitlines()
    unit = tmp_path / "cabinet.service"
    unit.write_text(text)
    verify(unit)
    venv_in_home = service.unit_text(service.UnitSpec(command=("/home/it/cabinet/.venv/bin/python", "-m", "node"),
                                                      data="/var/lib/cabinet", user="cabinet"))
    assert "ProtectHome=read-only" in venv_in_home.splitlines()       # else the program itself is hidden
    with pytest.raises(ValueError):
        service.unit_text(service.UnitSpec(command=("python",), data="/srv/c", user="root; rm -rf /"))


def test_install_writes_the_unit_gives_the_folder_to_the_user_and_uninstall_removes_it(box, tmp_path):
    units = tmp_path / "units"
    out = ok(cli(box, "service", "install", "--user", "daemon", "--unit-dir", str(units),
                 "--passphrase-from", "credential"))
    unit = units / "cabinet.service"
    assert f"wrote {unit}" in out and "systemd-creds encrypt" in out
    assert oct(unit.stat().st_mode & 0o777) == "0o644" and "User=daemon" in unit.read_text()
    verify(unit)
    owner = pwd.getpwnam("daemon").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert {p.stat().st_uid for p in [box, *box.rglob("*")]} == {owner}
    ok(cli(box, "service", "uninstall", "--unit-dir", str(units)))
    assert not unit.exists()
    refused(cli(box, "service", "uninstall", "--unit-dir", str(units)), "nothing to uninstall")


def test_install_refuses_clearly(tmp_path, box):
    refused(cli(tmp_path / "none", "service", "install", "--print"), "no cabinet node", "cabinet init")
    refused(cli(box, "service", "install", "--user", "no-such-user-here", "--unit-dir", str(tmp_path / "u")),
            "no user 'no-such-user-here'")
    refused(cli(box, "service", "install", "--print", "--web", "nowhere"), "HOST:PORT")
    assert not (tmp_path / "u" / "cabinet.service").exists()


def test_the_passphrase_comes_from_the_systemd_credential(box, tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    (creds / "cabinet-passphrase").write_text(PASSPHRASE + "\n")      # as `echo ... | systemd-creds` leaves it
    env = base_env(CREDENTIALS_DIRECTORY=str(creds))
    env.pop("CABINET_PASSPHRASE")
    assert "Node ID:" in ok(cli(box, "id", env=env))
    (creds / "cabinet-passphrase").write_text("not the passphrase")
    refused(cli(box, "id", env=env), "wrong passphrase")
    (creds / "cabinet-passphrase").unlink()
    refused(cli(box, "id", env=env), "no passphrase", "cabinet-passphrase")
    env["CABINET_PASSPHRASE"] = PASSPHRASE                               # the variable still wins
    (creds / "cabinet-passphrase").write_text("not the passphrase")
    assert "Node ID:" in ok(cli(box, "id", env=env))


MDWE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0 or libc.prctl(66, 0, 0, 0, 0) != 1:     # PR_SET_MDWE, PR_GET_MDWE
    sys.stderr.write("PR_SET_MDWE unavailable\\n")
    os._exit(97)
"""


def test_the_node_works_with_memory_that_is_never_writable_and_executable(practice, tmp_path, monkeypatch):
    """MemoryDenyWriteExecute=yes, as the kernel's PR_SET_MDWE (what systemd uses where it can) set in
    every cabinet process before anything loads: init, TLS, Argon2id, sealing, delivery all work."""
    site = tmp_path / "mdwe"
    site.mkdir()
    (site / "sitecustomize.py").write_text(MDWE)
    probe = subprocess.run([sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
                           env=base_env(PYTHONPATH=str(site)), capture_output=True, text=True, timeout=30)
    assert probe.returncode == 1 and "Permission denied" in probe.stderr, probe.stderr   # W+X really refused
    monkeypatch.setenv("PYTHONPATH", str(site))
    gp = practice("Dr Anne Martin")
    cardio = practice("Dr Paul Durand")
    for x, y in ((gp, cardio), (cardio, gp)):
        f = tmp_path / f"{x.data.name}.descriptor"
        x.ok("id", "--export", str(f))
        y.ok("contact", "add", str(f), "--id", x.node_id)
    cardio.start("--no-web")
    letter = tmp_path / "letter.txt"
    letter.write_text("Cher confrère")
    gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin", "--subject", "Douleur",
          "--letter", str(letter))
    wait_for(lambda: "Douleur" in cardio.ok("inbox"), 30, "the referral in the cardiologist's inbox")


def test_the_backup_destination_is_writable_for_the_service(box, tmp_path):
    dest = tmp_path / "nas share"
    ok(cli(box, "backup", str(dest), "--schedule", "daily"))
    text = ok(cli(box, "service", "install", "--print"))
    assert f'ReadWritePaths=-"{dest}"' in text.splitlines()
    unit = tmp_path / "cabinet.service"
    unit.write_text(text)
    verify(unit)
