"""The demo behind ./scripts/demo: two practices, one referral, one report back.

Everything goes through the real `cabinet` command, as a practitioner would
type it; each command is printed before its output. Two nodes run on
127.0.0.1 with their own data folders in a temporary directory (kept with
--keep, so you can look inside: nothing there is readable without the
passphrase).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LETTER = """Cher confrère,

Je vous adresse Mme Jeanne Martin, 65 ans, pour une douleur thoracique
d'effort apparue il y a trois semaines. ECG de repos joint.
Merci de votre avis sur l'indication d'une épreuve d'effort.

Bien confraternellement,
Dr Anne Martin
"""

REPORT = """Chère consœur,

J'ai vu Mme Martin ce jour. Épreuve d'effort négative, échographie normale.
Pas d'argument pour une coronaropathie. Je la revois dans un an.

Dr Paul Durand, cardiologue
"""


BOLD, PLAIN = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(os.environ, CABINET_PASSPHRASE="demo passphrase, not for real use",
                        CABINET_KDF=os.environ.get("CABINET_KDF", "interactive"), PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen] = []

    def cabinet(self, who: str, *args: str) -> str:
        data = self.root / who
        shown = " ".join(shlex.quote(a) for a in args)
        print(f"\n{BOLD}[{who}] $ cabinet {shown}{PLAIN}")
        proc = subprocess.run([sys.executable, "-m", "node", *args, "--data", str(data)], env=self.env,
                              capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        print(out.rstrip())
        if proc.returncode != 0:
            raise SystemExit(f"demo: that command failed (exit {proc.returncode})")
        return out

    def start(self, who: str) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "node", "run", "--data", str(self.root / who)],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(proc)
        print(f"\n{BOLD}[{who}] $ cabinet run{PLAIN}  (in the background)")
        seen: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "listening" in line:
                print(line.rstrip())
                # read on: a pipe nobody reads fills, and the node then stops at its next log line
                threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
                return
        proc.kill()
        raise SystemExit("demo: the node did not start:\n" + "".join(seen[-20:]))

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def node_id(out: str) -> str:
    return next(line.split(": ", 1)[1].strip() for line in out.splitlines() if line.startswith("Node ID:"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cabinet-demo-"))
    demo = Demo(root)
    try:
        print(f"Two practices in {root}")
        gp_port, cardio_port = free_port(), free_port()
        gp = node_id(demo.cabinet("gp", "init", "--name", "Dr Anne Martin", "--specialty", "médecine générale",
                                  "--city", "Lyon", "--listen", f"127.0.0.1:{gp_port}"))
        cardio = node_id(demo.cabinet("cardio", "init", "--name", "Dr Paul Durand", "--specialty", "cardiologie",
                                      "--city", "Lyon", "--rpps", "10101010101",
                                      "--listen", f"127.0.0.1:{cardio_port}"))
        demo.start("gp")
        demo.start("cardio")

        print("\n--- Each practice adds the other, checking the node ID it was given (e.g. by phone)")
        demo.cabinet("gp", "contact", "add", f"http://127.0.0.1:{cardio_port}", "--id", cardio)
        demo.cabinet("cardio", "contact", "add", f"http://127.0.0.1:{gp_port}", "--id", gp)
        demo.cabinet("gp", "contact", "verify", "Dr Paul Durand", "--yes")
        demo.cabinet("cardio", "contact", "verify", "Dr Anne Martin", "--yes")

        print("\n--- The GP sends a referral with a letter and an attachment")
        (root / "lettre.txt").write_text(LETTER, encoding="utf-8")
        ecg = root / "ECG repos.pdf"
        ecg.write_bytes(b"%PDF-1.4\n% demo ECG\n" + os.urandom(200_000))
        sent = demo.cabinet("gp", "send", "--to", "Dr Paul Durand", "--patient", "Jeanne Martin",
                            "--born", "1961-04-02", "--subject", "Douleur thoracique d'effort",
                            "--letter", str(root / "lettre.txt"), str(ecg))
        record = sent.split()[1]

        print("\n--- At the cardiologist's: it arrived, decrypted only there")
        demo.cabinet("cardio", "inbox")
        demo.cabinet("cardio", "show", record[:10])
        demo.cabinet("cardio", "export", record[:10], str(root / "cardio-export"))
        same = (root / "cardio-export" / ecg.name).read_bytes() == ecg.read_bytes()
        print(f"(exported attachment identical to the original: {same})")

        print("\n--- The cardiologist sends the report back in the same thread")
        (root / "compte-rendu.txt").write_text(REPORT, encoding="utf-8")
        demo.cabinet("cardio", "reply", record[:10], "--letter", str(root / "compte-rendu.txt"))

        print("\n--- Back at the GP's")
        demo.cabinet("gp", "inbox")
        demo.cabinet("gp", "thread", record[:10])
        demo.cabinet("gp", "outbox")
        demo.cabinet("gp", "audit", "verify")
        time.sleep(0.2)
        print("\nDemo complete: referral delivered, read, answered; the report is in the GP's thread.")
        return 0 if same else 1
    finally:
        demo.stop()
        if args.keep:
            print(f"Data folders kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
