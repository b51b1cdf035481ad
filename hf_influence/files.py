"""Files of saved folders: atomic writes (readers and crashes never see half a file, a failed write
keeps the old one) and checked reading of config.json."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through `write(temp_path)` in the same folder, then rename over `path`."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_UMASK)  # mkstemp makes the file private (0600); give it a normal file's mode
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` of a text file."""
    atomic_write(path, lambda temp: Path(temp).write_text(text))


def read_config(directory: Path, expected_format: str, max_version: int, what: str) -> dict[str, Any]:
    """Read and check `config.json` of a saved hf_influence folder (factors or index)."""
    from . import __version__

    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"No config.json in {directory}: not a saved {what} folder.")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the file is corrupt.") from error
    if not isinstance(config, dict) or config.get("format") != expected_format:
        found = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{path} describes {found!r}, not {expected_format!r}.")
    if config.get("format_version", 0) > max_version:
        raise ValueError(
            f"This {what} uses format version {config['format_version']}; hf_influence {__version__} reads "
            f"up to {max_version}. Upgrade hf_influence."
        )
    return config
