"""The README's promises, checked: its Python example runs as printed, its commands exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap

import pytest

from conftest import PASSPHRASE, ROOT, NodeProc, base_env, db_rows, drain, free_port

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_three_line_python_example_sends_a_referral(pair, tmp_path):
    gp, cardio = pair
    snippet = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert snippet.count("\n") <= 6                       # "three lines of Python", give or take the import
    body = textwrap.indent(snippet.replace('"~/.cabinet"', repr(str(gp.data))), "    ")
    program = f"import asyncio\npassphrase = {PASSPHRASE!r}\n\nasync def main():\n{body}\nasyncio.run(main())\n"
    (tmp_path / "ecg.pdf").write_bytes(b"%PDF-1.4 example")
    out = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=base_env(PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = db_rows(cardio, "SELECT COUNT(*) FROM records WHERE direction = 'in'")
    assert rows[0][0] == 1
    assert "ecg.pdf" in cardio.ok("inbox") or "1 (" in cardio.ok("inbox")


def test_every_command_the_readme_shows_exists():
    from node.faces.cli import build_parser
    parser = build_parser()
    commands = set(re.findall(r"^cabinet ([a-z-]+(?: [a-z-]+)?)", README, re.M))
    assert commands
    for cmd in commands:
        words = cmd.split()
        probe = subprocess.run([sys.executable, "-m", "node", *words, "--help"], cwd=ROOT, env=base_env(),
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0 and len(words) == 2:      # "cabinet send --to" style: the first word is the command
            probe = subprocess.run([sys.executable, "-m", "node", words[0], "--help"], cwd=ROOT,
                                   env=base_env(), capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, f"README shows 'cabinet {cmd}', which does not exist: {probe.stderr}"
    assert parser.prog == "cabinet"


def _block_after(heading: str) -> str:
    return re.search(re.escape(heading) + r".*?```sh\n(.*?)```", README, re.S).group(1)


def _run_as_printed(line: str, cwd, env: dict) -> subprocess.CompletedProcess:
    """One README line, split as a shell would (its comment dropped), run as `cabinet`."""
    words = shlex.split(line, comments=True)
    assert words[0] == "cabinet", line
    return subprocess.run([sys.executable, "-m", "node", *words[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_the_patient_commands_run_as_printed(pair, tmp_path):
    """Each line of 'Patients in control', by whoever its comment names, placeholders filled in."""
    gp, cardio = pair                     # Dr Anne Martin holds the records; Dr Paul Durand asks for them
    letter = tmp_path / "l.txt"
    letter.write_text("Cher confrère")
    record = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin", "--letter", str(letter)).split()[1]
    work = tmp_path / "desk"
    work.mkdir()
    nowhere = tmp_path / "no-node-here"
    actors = {"at the practice": base_env(CABINET_DATA=str(gp.data)),
              "the patient, with the card alone": {k: v for k, v in base_env(CABINET_DATA=str(nowhere)).items()
                                                   if k != "CABINET_PASSPHRASE"},
              "the practitioner the grant names": base_env(CABINET_DATA=str(cardio.data)),
              "the patient at a practice's desk": base_env(CABINET_DATA=str(gp.data))}
    filled = {"8c675057ee": record[:10], "<practitioner node ID>": cardio.node_id}
    env, outputs = None, []
    for line in _block_after("## Patients in control").splitlines():
        if line.startswith("#"):
            env = next(e for who, e in actors.items() if line.lstrip("# ").startswith(who))
            continue
        for placeholder, value in filled.items():
            line = line.replace(placeholder, shlex.quote(value))
        proc = _run_as_printed(line, work, env)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}{proc.stderr}"
        outputs.append(proc.stdout)
        if " grant " in line:
            filled["<token>"] = proc.stdout.split()[0]
            filled["<grant ID>"] = re.search(r"Grant (\S+):", proc.stderr).group(1)
    assert not nowhere.exists()                                  # the patient's command needed no node
    assert len(outputs) == 6
    assert "1 record(s) sealed for this node" in outputs[3]
    assert f"Grant {filled['<grant ID>']} revoked" in outputs[4]
    assert "History of patient P-0042" in outputs[5] and "grant-revoked" in outputs[5]


def test_revoke_and_history_without_a_practice_node_say_where_to_run_them(tmp_path):
    card_env = base_env(CABINET_DATA=str(tmp_path / "practice"))
    made = subprocess.run([sys.executable, "-m", "node", "init", "--name", "Dr Anne Martin"], cwd=tmp_path,
                          env=card_env, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    enrolled = subprocess.run([sys.executable, "-m", "node", "patient", "enroll", "--patient", "P-7",
                               "--out", str(tmp_path)], cwd=tmp_path, env=card_env, capture_output=True,
                              text=True, timeout=60)
    assert enrolled.returncode == 0, enrolled.stderr
    patient_env = {k: v for k, v in base_env(CABINET_DATA=str(tmp_path / "none")).items()
                   if k != "CABINET_PASSPHRASE"}
    for args in (["revoke", "--card", "card-P-7.txt", "A" * 22], ["history", "--card", "card-P-7.txt"]):
        proc = subprocess.run([sys.executable, "-m", "node", "patient", *args], cwd=tmp_path, env=patient_env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert "carried by a practice's node" in proc.stderr and "passphrase" not in proc.stderr


@pytest.fixture
def directory_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bootstrap", "--listen", f"127.0.0.1:{port}",
                             "--data", str(tmp_path / "boot")],
                            cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    assert "listening" in line, line + proc.stdout.read()
    drain(proc, [])                         # read on: a full pipe would stop the server at its next log line
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=15)


def test_the_directory_search_finds_as_printed(tmp_path, directory_server):
    """`cabinet directory search cardiologue Lyon` finds a colleague whose descriptor says
    "cardiology"; the README's GP ("médecine générale") is found as a "généraliste"."""
    line = next(l for l in _block_after("## Finding and trusting colleagues").splitlines()
                if "directory search" in l)
    gp = NodeProc(tmp_path / "gp", "Dr Anne Martin", free_port()).init(
        specialty="médecine générale", city="Lyon", bootstrap=directory_server)
    cardio = NodeProc(tmp_path / "cardio", "Dr Paul Durand", free_port()).init(
        specialty="cardiology", city="Lyon", bootstrap=directory_server)
    for n in (gp, cardio):
        assert "accepted by 1 of 1" in n.ok("directory", "announce")
    proc = _run_as_printed(line, ROOT, base_env(CABINET_DATA=str(gp.data)))
    assert proc.returncode == 0, proc.stderr
    assert "Dr Paul Durand" in proc.stdout and cardio.node_id in proc.stdout
    assert "Dr Anne Martin" in cardio.ok("directory", "search", "généraliste", "lyon")
    assert "Dr Anne Martin" in cardio.ok("directory", "search", "general", "practice")
    assert "No practitioner found" in cardio.ok("directory", "search", "pédiatre", "Lyon")


def test_the_readme_says_how_long_an_id_prefix_must_be(pair, tmp_path):
    """"6 or more characters of the ID": 6 work, 5 are refused with that rule named."""
    gp, cardio = pair
    assert "6 or more characters of the ID" in README
    letter = tmp_path / "l.txt"
    letter.write_text("Cher confrère")
    record = gp.ok("send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin", "--letter", str(letter)).split()[1]
    assert "Cher confrère" in gp.ok("show", record[:6])
    short = gp.cli("show", record[:5])
    assert short.returncode != 0 and "at least 6" in short.stderr
