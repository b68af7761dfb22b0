"""The README's promises, checked: its Python example runs as printed, its commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

from conftest import PASSPHRASE, ROOT, base_env, db_rows

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
