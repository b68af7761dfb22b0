"""Benchmark: seal then open one large attachment, against raw secretstream.

    .venv/bin/python scripts/bench_envelope.py [--size-mib 256] [--repeat 5] [--time-limit 900] [--profile FILE]

Measured (one process, files in a temporary folder, page cache warm):

  cabinet   node.store.blobs.seal_files(Sealer, Manifest, [file], body)  -> ciphertext file
            node.store.blobs.open_to_files(...)                            -> plaintext file
            (this includes the SHA-256 of the ciphertext on both sides, the
            manifest, and the 2-thread pipeline seal_files uses)

  informational: the sealed body fed through blobs.Inbound in 1 MiB batches,
            as the receiving node's worker thread does (hash + decrypt + parse +
            write, then fsync in finish)

  baseline  crypto_secretstream_xchacha20poly1305_push over the same file read
            in 1 MiB pieces (16 x 64 KiB chunks), ciphertext written to a file;
            then that file read back in 16-chunk pieces, _pull of each chunk,
            plaintext written to a file. Single thread, no hashing: the cost of
            the cipher plus the same file I/O.

After one uncounted warm-up round of each, both are run --repeat times,
alternating; the best round of each is reported (the least disturbed by the
machine). Target: cabinet >= 0.8 x baseline. A third, informational line adds
SHA-256 of the ciphertext (both directions) to the baseline, to show how much
of any gap is hashing. Before every round the page cache is primed
(bench_common.prime_page_cache; --no-prime to skip). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True          # no scripts/__pycache__ left behind
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402

import nacl.bindings as B  # noqa: E402

from node.core.envelope import (ABYTES, CHUNK, CT_CHUNK, TAG_FINAL, TAG_MESSAGE, Attachment, Head, Manifest,  # noqa: E402
                           Recipient, Sealer)
from node.core.identity import Identity, node_id_bytes  # noqa: E402
from node.store import blobs as blobstore  # noqa: E402

TARGET = 0.8
PIECE = 16  # chunks per file read, as blobs.READ_SIZE
WRITE_BATCH = 1 << 20   # what the receiving node hands blobs.Inbound at a time (intake/delivery WRITE_BATCH)


def _open_to_files(store: blobstore.BlobStore, record_id: str, header, key, open_sink):
    """blobs.open_to_files, whichever of its two signatures this checkout has."""
    import inspect
    first = next(iter(inspect.signature(blobstore.open_to_files).parameters))
    if first == "blobs":                    # open_to_files(blobs, record_id, header, key, open_sink)
        return blobstore.open_to_files(store, record_id, header, key, open_sink)
    return blobstore.open_to_files(store.path(record_id), header, key, open_sink)   # (source, header, ...)


def cabinet_round(src: Path, work: Path, size: int, sender: Identity, reader: Identity,
                  receive: list | None = None) -> tuple[float, float]:
    """seal_files then open_to_files; returns (seal seconds, open seconds).

    With `receive` (a list), also feeds the sealed body through blobs.Inbound the
    way the receiving node does (1 MiB batches, as delivery.WRITE_BATCH) and
    appends (seconds for the writes, seconds for finish) to it: the receiver's
    per-byte work on its worker thread, without any network.
    """
    manifest = Manifest(patient="Jeanne Martin", born="1961-04-02", subject="Scan",
                        letter="Dear colleague, please find the scan attached.",
                        attachments=(Attachment(name=src.name, size=size),))
    sealer = Sealer(sender=sender, recipients=[Recipient(node_id_bytes(reader.sign_public), reader.enc_public)],
                    kind="referral", created=int(time.time() * 1000))
    store = blobstore.BlobStore(work)
    record_id = sealer.record_id.hex()
    tmp = store.incoming / f"{record_id}.sealing"
    t0 = time.perf_counter()
    body_size, digest = blobstore.seal_files(sealer, manifest, [src], tmp)
    t1 = time.perf_counter()
    head_raw = sealer.head(body_size=body_size, body_sha256=digest)
    dest = store.path(record_id)
    dest.parent.mkdir(exist_ok=True)
    os.replace(tmp, dest)                           # what BlobStore.commit does, minus the fsyncs
    head = Head.from_wire(head_raw)
    key = head.content_key(reader)
    if receive is not None:
        inbound_path = work / "inbound.body"
        with open(dest, "rb") as fh:
            t0 = time.perf_counter()
            inbound = blobstore.Inbound(inbound_path, head.header, key)
            while piece := fh.read(WRITE_BATCH):
                inbound.write(piece)
            t1 = time.perf_counter()
            inbound.finish()
            receive.append((t1 - t0, time.perf_counter() - t1))
        inbound_path.unlink()
    out = work / "cabinet.out"
    t2 = time.perf_counter()
    _open_to_files(store, record_id, head.header, key, lambda i, m: open(out, "wb"))
    t3 = time.perf_counter()
    if os.path.getsize(out) != size:
        raise AssertionError("cabinet round trip lost bytes")
    dest.unlink()
    out.unlink()
    return t1 - t0, t3 - t2


def baseline_round(src: Path, work: Path, size: int, hashing: bool = False) -> tuple[float, float]:
    """Raw secretstream push to a file, then pull from it to a file; same piece sizes."""
    key = os.urandom(32)
    ct_path, out_path = work / "raw.ct", work / "raw.out"
    h1 = hashlib.sha256() if hashing else None
    t0 = time.perf_counter()
    st = B.crypto_secretstream_xchacha20poly1305_state()
    ss_header = B.crypto_secretstream_xchacha20poly1305_init_push(st, key)
    with open(src, "rb") as fin, open(ct_path, "wb") as fout:
        left = size
        while left > 0:
            piece = fin.read(PIECE * CHUNK)
            if not piece:
                raise AssertionError("short read")
            left -= len(piece)
            out = []
            for off in range(0, len(piece), CHUNK):
                last = left == 0 and off + CHUNK >= len(piece)
                out.append(B.crypto_secretstream_xchacha20poly1305_push(
                    st, piece[off:off + CHUNK], None, TAG_FINAL if last else TAG_MESSAGE))
            if h1:
                for c in out:
                    h1.update(c)
            fout.writelines(out)
    t1 = time.perf_counter()
    h2 = hashlib.sha256() if hashing else None
    st = B.crypto_secretstream_xchacha20poly1305_state()
    B.crypto_secretstream_xchacha20poly1305_init_pull(st, ss_header, key)
    final = False
    with open(ct_path, "rb") as fin, open(out_path, "wb") as fout:
        while piece := fin.read(PIECE * CT_CHUNK):
            if h2:
                h2.update(piece)
            out = []
            for off in range(0, len(piece), CT_CHUNK):
                plain, tag = B.crypto_secretstream_xchacha20poly1305_pull(st, piece[off:off + CT_CHUNK], None)
                final = tag == TAG_FINAL
                out.append(plain)
            fout.writelines(out)
    t2 = time.perf_counter()
    if not final or os.path.getsize(out_path) != size or os.path.getsize(ct_path) < size + ABYTES:
        raise AssertionError("baseline round trip is broken")
    if hashing and h1.digest() != h2.digest():
        raise AssertionError("baseline hashes differ")
    ct_path.unlink()
    out_path.unlink()
    return t1 - t0, t2 - t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--time-limit", type=float, default=900, help="abort after this many seconds (default 900)")
    ap.add_argument("--quiet-wait", type=float, default=120,
                    help="wait up to this many seconds for the CPUs to be idle before starting (default 120)")
    ap.add_argument("--no-prime", dest="prime", action="store_false",
                    help="do not prime the page cache before each round (see bench_common.prime_page_cache)")
    ap.add_argument("--profile", metavar="FILE",
                    help="also profile 3 rounds of each with py-spy (if installed in the venv; raw stacks to "
                         "FILE-cabinet.txt / FILE-baseline.txt), else one cabinet round with cProfile to FILE")
    a = ap.parse_args()
    size = a.size_mib * bc.MiB

    bc.header(f"bench_envelope: seal + open a {a.size_mib} MiB attachment", a.quiet_wait)
    with bc.time_limit(a.time_limit), bc.temp_dir() as tmp:
        src = bc.make_file(tmp / "scan.bin", size)
        bc.warm(src)
        sender, reader = Identity.generate(), Identity.generate()
        res: dict[str, list[tuple[float, float]]] = {"cabinet": [], "baseline": [], "baseline+sha256": []}
        receive: list[tuple[float, float]] = []
        baseline_round(src, tmp, size)                      # warm-up, not counted: first writes of
        cabinet_round(src, tmp, size, sender, reader)       # fresh files are slower on some machines
        def fresh() -> None:
            os.sync()           # start every round with no dirty pages left by the previous one
            if a.prime:
                bc.prime_page_cache(tmp, 2 * size + 64 * bc.MiB)

        for i in range(a.repeat):
            fresh()
            res["baseline"].append(baseline_round(src, tmp, size))
            fresh()
            res["cabinet"].append(cabinet_round(src, tmp, size, sender, reader, receive))
            fresh()
            res["baseline+sha256"].append(baseline_round(src, tmp, size, hashing=True))
            print(f"   run {i + 1}/{a.repeat}: " + "  ".join(
                f"{k} {bc.rate(size, sum(v[-1])):.0f} MiB/s" for k, v in res.items()), flush=True)

        best = {k: min(v, key=sum) for k, v in res.items()}
        print()
        print(f"   {'':18}{'seal MiB/s':>12}{'open MiB/s':>12}{'seal+open MiB/s':>17}")
        for k, (s, o) in best.items():
            print(f"   {k:18}{bc.rate(size, s):12.0f}{bc.rate(size, o):12.0f}{bc.rate(size, s + o):17.0f}")
        cs, co = best["cabinet"]
        bs, bo = best["baseline"]
        ratio = (bs + bo) / (cs + co)
        print()
        print(f"   ratio cabinet / raw secretstream: seal {bs / cs:.2f}, open {bo / co:.2f}, "
              f"seal+open {ratio:.2f}  (target >= {TARGET})  -> {bc.verdict(ratio, TARGET)}")
        hs, ho = best["baseline+sha256"]
        print(f"   (cabinet / raw secretstream with SHA-256 on both sides: {(hs + ho) / (cs + co):.2f})")
        rw, rf = min(receive, key=sum)
        print(f"   informational: blobs.Inbound (what a receiving node does per byte, on one thread, no network): "
              f"{bc.rate(size, rw):.0f} MiB/s for write(), {bc.rate(size, rw + rf):.0f} MiB/s with finish() (fsync)")

        if a.profile:
            out = Path(a.profile)
            if Path(bc.pyspy()).exists():           # py-spy sees every thread (the pipeline's too)
                for what, fn in (("cabinet", lambda: cabinet_round(src, tmp, size, sender, reader)),
                                 ("baseline", lambda: baseline_round(src, tmp, size))):
                    f = out.with_name(f"{out.stem}-{what}.txt")
                    with bc.SelfProfile(f):
                        for _ in range(3):
                            fn()
                    print(f"\n   py-spy, 3 {what} rounds -> {f}\n{bc.summarize_pyspy(f)}")
            else:                                   # cProfile: main thread only
                import cProfile
                import pstats
                prof = cProfile.Profile()
                prof.enable()
                cabinet_round(src, tmp, size, sender, reader)
                prof.disable()
                prof.dump_stats(out)
                print(f"\n   cProfile of one cabinet round (main thread only) -> {out}")
                pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    bc.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
