"""Multipart uploads (a referral, a reply): text fields in memory, files streamed to disk.

Files go, piece by piece, into a private folder under the data folder's incoming/
(`web-<random>.upload/<n>/<safe name>`), so an upload of any size never sits in
memory and is sealed from the same disk. Each file is capped at the envelope's
limit, the upload stops while some space is still left on the disk, and the
folder is removed once the record is sealed (or the request failed): the sealed
record is then the only copy.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import BodyPartReader, web

from ...node import MAX_ATTACHMENT, MAX_ATTACHMENTS, TooLarge, UsageError, safe_name

PIECE = 256 * 1024
FIELD_MAX = 1 << 20                 # a text field (the letter typed in a page included)
DISK_RESERVE = 256 << 20            # never fill the disk: the node must still seal, log and start
FILE_FIELDS = ("attachment", "attachments", "letter")


@dataclass
class Upload:
    folder: Path | None                   # None: a urlencoded form, no files
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    letter_file: Path | None = None

    def one(self, name: str, default: str = "") -> str:
        values = self.fields.get(name, [])
        if len(values) > 1:
            raise UsageError(f"give {name!r} once")
        return values[0] if values else default

    def many(self, name: str) -> list[str]:
        return [v.strip() for v in self.fields.get(name, []) if v.strip()]

    def letter(self) -> str | Path:
        if self.letter_file is not None:
            if self.fields.get("letter"):
                raise UsageError("give the letter as text or as a file, not both")
            return self.letter_file
        return self.one("letter")

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


async def receive(request: web.Request, incoming: Path) -> Upload:
    """Read a multipart/form-data body; the caller must `await asyncio.to_thread(upload.remove)`."""
    if request.content_type == "application/x-www-form-urlencoded":      # text fields only, bounded
        form = await request.post()
        upload = Upload(None)
        for name, value in form.items():
            upload.fields.setdefault(name, []).append(str(value))
        return upload
    if not request.content_type.startswith("multipart/form-data"):
        raise UsageError("send multipart/form-data (fields and files)")
    folder = incoming / f"web-{secrets.token_hex(12)}.upload"
    await asyncio.to_thread(folder.mkdir, mode=0o700)
    upload = Upload(folder)
    try:
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                raise UsageError("nested multipart bodies are not accepted")
            name = part.name or ""
            if part.filename is not None and name in FILE_FIELDS:
                path = await _save_file(part, folder, len(upload.files) + 1)
                if name == "letter":
                    if upload.letter_file is not None:
                        raise UsageError("give one letter file")
                    upload.letter_file = path
                else:
                    upload.files.append(path)
                if len(upload.files) > MAX_ATTACHMENTS:
                    raise TooLarge(f"at most {MAX_ATTACHMENTS} attachments per record")
            elif part.filename is not None:
                raise UsageError(f"a file is accepted only as {' or '.join(FILE_FIELDS)}")
            else:
                upload.fields.setdefault(name, []).append(await _read_field(part, name))
    except BaseException:
        await asyncio.to_thread(upload.remove)
        raise
    return upload


async def _read_field(part: BodyPartReader, name: str) -> str:
    data = bytearray()
    while piece := await part.read_chunk(PIECE):
        data += piece
        if len(data) > FIELD_MAX:
            raise TooLarge(f"the field {name!r} is over {FIELD_MAX // 1024} KiB (send a long letter as a file)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the field {name!r} is not UTF-8 text") from None


async def _save_file(part: BodyPartReader, folder: Path, n: int) -> Path:
    sub = folder / str(n)
    await asyncio.to_thread(sub.mkdir, mode=0o700)
    path = sub / safe_name(part.filename or "attachment", set())
    fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    size = 0
    with os.fdopen(fd, "wb") as fh:
        while piece := await part.read_chunk(PIECE):
            size += len(piece)
            if size > MAX_ATTACHMENT:
                raise TooLarge(f"an attachment is over the {MAX_ATTACHMENT // 2**30} GiB limit")
            await asyncio.to_thread(_write, fh, piece, folder)
    return path


def _write(fh, piece: bytes, folder: Path) -> None:
    if shutil.disk_usage(folder).free - len(piece) < DISK_RESERVE:
        raise TooLarge("the data folder's disk is nearly full: the upload was stopped")
    fh.write(piece)
