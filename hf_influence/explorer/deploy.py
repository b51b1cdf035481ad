"""Deploying the Influence Explorer as a Hugging Face Space in one step.

A Space needs the app (`space/app.py`), its card (`space/README.md`: the Gradio SDK and version), the
requirements, the `hf_influence` package beside the app (the Space imports it from there) and the
artifacts it serves. `assemble_space` writes all of that into a folder — the artifacts as `explorer.json`,
the `ExplorerConfig` the app reads when no `HFI_*` variable is set — and `push_space` uploads it as one
commit: `hf-influence space --push-to-hub REPO --pipeline ... --factors ... --index ... --dataset ...`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..artifacts import check_output_folder
from ..files import atomic_write_text
from .config import ARTIFACTS, ExplorerConfig

TEMPLATE = Path(__file__).resolve().parent / "space"
CONFIG_FILE = "explorer.json"
PACKAGE = Path(__file__).resolve().parents[1]


def assemble_space(output_dir: str | Path, config: ExplorerConfig, overwrite: bool = False) -> Path:
    """Write a ready-to-push Space serving `config`'s artifacts into `output_dir` (new or empty, unless
    `overwrite`); artifacts given as Hub ids are listed in the card's metadata, so they link to the Space."""
    output_dir = Path(output_dir)
    check_output_folder(output_dir, "hf_influence.space", "the Space", overwrite)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in ("app.py", "requirements.txt"):
        shutil.copyfile(TEMPLATE / name, output_dir / name)
    atomic_write_text(output_dir / "README.md", _card(config))
    atomic_write_text(output_dir / CONFIG_FILE, json.dumps(dataclasses.asdict(config), indent=2))
    shutil.copytree(
        PACKAGE, output_dir / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True
    )
    return output_dir


def push_space(
    repo_id: str, config: ExplorerConfig, token: str | bool | None = None, private: bool | None = None
) -> Any:
    """Assemble the Space in a temporary folder and upload it to the Space repo `repo_id` (created with the
    Gradio SDK if needed) in one commit; returns the `CommitInfo`."""
    from ..hub import push_folder

    with tempfile.TemporaryDirectory() as folder:
        assemble_space(folder, config, overwrite=True)
        message = "Deploy the Influence Explorer with hf_influence"
        return push_folder(
            folder, repo_id, "space", private=private, token=token, commit_message=message, space_sdk="gradio"
        )


def config_from_file(path: str | Path) -> ExplorerConfig | None:
    """The `ExplorerConfig` of an assembled Space's explorer.json, or None where there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    from ..serialization import from_json

    return from_json(ExplorerConfig, json.loads(path.read_text()), str(path))


def _card(config: ExplorerConfig) -> str:
    """The template card, with the artifacts that are Hub ids listed as the Space's models and datasets."""
    template = (TEMPLATE / "README.md").read_text()
    header, _, body = template.removeprefix("---\n").partition("\n---\n")
    kept = [line for line in header.splitlines() if not line.startswith("#")]
    hub_ids = {name: getattr(config, name) for name in ARTIFACTS if _is_repo_id(getattr(config, name))}
    models = [hub_ids[name] for name in ("pipeline", "factors") if name in hub_ids]
    datasets = [hub_ids[name] for name in ("dataset", "index") if name in hub_ids]
    for key, values in (("models", models), ("datasets", datasets)):
        if values:
            kept += [f"{key}:", *(f"  - {value}" for value in values)]
    return "---\n" + "\n".join(kept) + "\n---\n" + body


def _is_repo_id(name: str) -> bool:
    """An artifact named by a Hub id ('owner/name'), not a local folder."""
    from ..hub import is_repo_id

    return not Path(name).exists() and name.count("/") == 1 and is_repo_id(name)
