"""Files of saved folders: atomic writes (readers and crashes never see half a file, a failed write keeps
the old one) and checksums (a file altered after it was written is refused by name)."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

CHECKSUM_BLOCK = 1 << 24  # bytes hashed at a time: a checksum never holds a whole large file in memory


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through `write(temp_path)` in the same folder, then rename over `path`.

    The final file gets the usual permissions (0666 less the process's umask, as the operating system applies
    it to a file created here), so it looks like any other the user writes."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = os.stat(temp).st_mode & 0o777
    try:
        write(str(temp))
        os.chmod(temp, mode)  # some writers (safetensors) replace the file by a private one of their own
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of a text file."""
    atomic_write(path, lambda temp: Path(temp).write_text(text))


def file_checksum(path: Path) -> str:
    """The blake2b (128-bit) digest of a file, read block by block."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(CHECKSUM_BLOCK):
            digest.update(block)
    return digest.hexdigest()
