"""Reading safetensors files: all or some tensors, read or memory-mapped, a damaged file refused by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "U8": torch.uint8,
    "I8": torch.int8,
}


def read_safetensors(
    path: Path, keep: Callable[[str], bool] = lambda name: True, mmap: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file whose names pass `keep`; with `mmap`, views of the memory-mapped
    file (only the pages used are read: large factors, local or cached)."""
    try:
        with safe_open(path, framework="pt") as handle:
            names = [name for name in handle.keys() if keep(name)]  # noqa: SIM118 (safe_open has no __iter__)
            if not mmap:
                return {name: handle.get_tensor(name) for name in names}
    except SafetensorError as error:
        raise ValueError(f"Cannot read {path}: {error}. The file is corrupt or truncated.") from error
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_size))
    data = torch.from_file(str(path), shared=False, size=path.stat().st_size, dtype=torch.uint8)[8 + header_size :]
    tensors = {}
    for name in names:
        start, end = header[name]["data_offsets"]
        tensors[name] = data[start:end].view(SAFETENSORS_DTYPES[header[name]["dtype"]]).view(header[name]["shape"])
    return tensors
