"""`Artifact`: what factors, gradient indices and LDS ground truths share as saved folders and Hub repos.

In the manner of `huggingface_hub.ModelHubMixin`, an artifact is a folder (or a Hub repo at a revision) of
`config.json`, a card (`README.md`) and data files. This base owns everything that is the same for all three:

* `save_pretrained` writes the data files, then the card, then config.json (each atomically, config.json
  last, so a folder with a config.json is complete); it refuses a folder holding anything else — another
  kind of artifact, a pipeline, a dataset — unless `overwrite=True`, and removes only the files an earlier
  save of the same artifact recorded.
* config.json is typed metadata (`serialization.py`) plus, for every data file, its size and blake2b
  checksum. `from_pretrained` migrates an older format version, checks the metadata strictly, downloads only
  the files it reads and verifies each file's size and checksum the first time it is read.
* `push_to_hub` saves into a temporary folder and uploads it as one commit (stale data files deleted).
* `check_compatible` (for artifacts of a model) refuses a model whose layers or weights differ.

A subclass says what it is (`FORMAT`, `FORMAT_VERSION`, `REPO_TYPE`, `DESCRIPTION`, `METADATA`, `DATA_FILES`)
and implements `_write_data`, `_card` and `_read`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .files import atomic_write_text, file_checksum
from .hub import RepoFiles, open_repo, push_folder
from .serialization import from_json, to_json

if TYPE_CHECKING:
    from .task import DiffusionTask

CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
FORMAT_PREFIX = "hf_influence."

A = TypeVar("A", bound="Artifact")


@dataclass(frozen=True)
class FileRecord:
    """A data file's size and blake2b checksum (format version 1 recorded sizes only, and its earliest saves
    not even those: None where unknown)."""

    size: int | None
    blake2b: str | None = None

    @classmethod
    def of(cls, path: Path) -> FileRecord:
        return cls(path.stat().st_size, file_checksum(path))


@dataclass
class ArtifactFiles:
    """The data files of one opened artifact: each fetched (downloaded from the Hub, or found in the folder)
    when first needed, its size checked at once and its checksum the first time `verified` asks for it."""

    repo: RepoFiles
    records: dict[str, FileRecord]
    _verified: set[str] = field(default_factory=set)

    def path(self, name: str, verify: bool = True) -> Path:
        """The local path of data file `name`, checked against its record."""
        if name not in self.records:
            raise KeyError(f"{name} is not a file of {self.repo.describe()}.")
        record = self.records[name]
        path = self.repo.fetch(name, record.size)
        if verify and name not in self._verified:
            if record.blake2b is not None and file_checksum(path) != record.blake2b:
                raise ValueError(
                    f"{name} in {self.repo.describe()} does not match its checksum: the file is corrupt. "
                    + (
                        "Save or build it again."
                        if self.repo.is_local
                        else "Delete it from the cache and download again."
                    )
                )
            self._verified.add(name)
        return path

    @property
    def directory(self) -> Path:
        """The local folder holding the files (the snapshot folder of a Hub repo)."""
        return self.repo.fetch(CONFIG_NAME).parent


class Artifact:
    """Base class of saved artifacts (see the module docstring)."""

    FORMAT: ClassVar[str]
    FORMAT_VERSION: ClassVar[int]
    REPO_TYPE: ClassVar[str]  # the Hub repo type it is pushed to by default
    DESCRIPTION: ClassVar[str]  # what it is, in messages: "influence factors"
    METADATA: ClassVar[type]  # the dataclass of config.json's own fields
    DATA_FILES: ClassVar[tuple[str, ...]]  # glob patterns of the data files it writes (for stale files on the Hub)
    # format version v → a function turning a version-v config.json into a version-(v + 1) one.
    MIGRATIONS: ClassVar[dict[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {}

    metadata: Any

    # ------------------------------------------------------------------ what a subclass implements

    def _write_data(self, directory: Path, staging: bool = False, **options: Any) -> tuple[list[str], Any]:
        """Write the data files into `directory` (each atomically); returns their names and the metadata to
        record with them (the artifact's own, or a copy saying how the files were stored). `staging` says the
        folder is a temporary one for an upload: large files may be linked there instead of copied."""
        raise NotImplementedError

    def _card(self, metadata: Any, repo_id: str | None) -> str:
        """The Hub card (README.md) of this artifact, as saved with `metadata`."""
        raise NotImplementedError

    @classmethod
    def _read(cls: type[A], files: ArtifactFiles, metadata: Any, **options: Any) -> A:
        """The artifact from its checked metadata and its data files."""
        raise NotImplementedError

    # ------------------------------------------------------------------ saving

    def save_pretrained(
        self, save_directory: str | os.PathLike, overwrite: bool = False, repo_id: str | None = None, **options: Any
    ) -> list[str]:
        """Write the artifact to `save_directory`; returns the names of the files written.

        An earlier save of the same kind of artifact there is replaced (its stale data files removed); a folder
        holding anything else is refused unless `overwrite=True` (which still removes nothing it did not write).
        `repo_id` only names the repo in the card's loading example."""
        return self._save(Path(save_directory), overwrite, repo_id, False, options)

    def _save(self, directory: Path, overwrite: bool, repo_id: str | None, staging: bool, options: dict) -> list[str]:
        previous = check_output_folder(directory, self.FORMAT, self.DESCRIPTION, overwrite)
        directory.mkdir(parents=True, exist_ok=True)
        names, metadata = self._write_data(directory, staging=staging, **options)
        self._write_description(directory, metadata, {name: FileRecord.of(directory / name) for name in names}, repo_id)
        for stale in previous - set(names):
            (directory / stale).unlink(missing_ok=True)
        return [CONFIG_NAME, CARD_NAME, *names]

    def _write_description(
        self, directory: Path, metadata: Any, records: dict[str, FileRecord], repo_id: str | None = None
    ) -> None:
        """The card, then config.json (last: a folder with a config.json is complete)."""
        atomic_write_text(directory / CARD_NAME, self._card(metadata, repo_id))
        atomic_write_text(directory / CONFIG_NAME, json.dumps(self._config_json(metadata, records), indent=2))

    def _config_json(self, metadata: Any, records: dict[str, FileRecord]) -> dict[str, Any]:
        from . import __version__

        header = {"format": self.FORMAT, "format_version": self.FORMAT_VERSION, "library_version": __version__}
        return {**header, **metadata_json(metadata), "files": to_json(records)}

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        repo_type: str | None = None,
        **options: Any,
    ) -> Any:
        """Save to a temporary folder and upload it as one commit to `repo_id` (created if needed; a
        `REPO_TYPE` repo unless `repo_type` says otherwise); data files of an earlier push that this one
        does not write again are deleted in the same commit. Returns the `CommitInfo`."""
        with tempfile.TemporaryDirectory() as folder:
            files = self._save(Path(folder), False, repo_id, True, options)
            return push_folder(
                folder,
                repo_id,
                repo_type or self.REPO_TYPE,
                files,
                private=private,
                token=token,
                revision=revision,
                commit_message=commit_message or f"Upload {self.DESCRIPTION} with hf_influence",
                create_pr=create_pr,
                stale_patterns=list(self.DATA_FILES),
            )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls: type[A],
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        repo_type: str | None = None,
        **options: Any,
    ) -> A:
        """Load from a local folder or a Hub repo at `revision` (a branch, tag or commit), reading config.json
        first (which pins the commit) and then only the data files needed."""
        repo = open_repo(path_or_repo_id, repo_type or cls.REPO_TYPE, revision, token, cache_dir, local_files_only)
        config = cls.read_config(repo.fetch(CONFIG_NAME))
        records = from_json(dict[str, FileRecord], config.pop("files"), f"{repo.describe()}: config.json files")
        metadata = metadata_from_json(cls.METADATA, config, f"{repo.describe()}: config.json")
        return cls._read(ArtifactFiles(repo, records), metadata, **options)

    @classmethod
    def read_config(cls, path: Path) -> dict[str, Any]:
        """config.json as a dict of the current format version (older versions migrated), without the header."""
        from . import __version__

        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}); the file is corrupt.") from error
        found = config.get("format") if isinstance(config, dict) else None
        if found != cls.FORMAT:
            described = f"{found!r}" if found else "no hf_influence format"
            raise ValueError(f"{path} describes {described}, not {cls.FORMAT!r} ({cls.DESCRIPTION}).")
        version = config.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{path} has an invalid format_version {version!r}: the file is corrupt.")
        if version > cls.FORMAT_VERSION:
            raise ValueError(
                f"These {cls.DESCRIPTION} use format version {version}; hf_influence {__version__} reads up to "
                f"{cls.FORMAT_VERSION}. Upgrade hf_influence."
            )
        while version < cls.FORMAT_VERSION:
            config = cls.MIGRATIONS[version](config)
            version += 1
        for key in ("format", "format_version", "library_version"):
            config.pop(key, None)
        return config


class ModelArtifact(Artifact):
    """An artifact computed on a denoiser's layers: its metadata records the `model` (a `ModelProvenance`) and
    the weight `shapes` of the layers, by qualified name."""

    def check_compatible(self, task: DiffusionTask, force: bool = False) -> None:
        """Refuse a model other than the one this was computed on: a missing layer or another weight shape,
        then other weights (their fingerprint; `force=True` skips that check only)."""
        from .curvature.layers import layer_kind

        modules = dict(task.denoiser.named_modules())
        problems = []
        for name, shape in self.metadata.shapes.items():
            module = modules.get(name)
            kind = None if module is None else layer_kind(module)
            if module is None:
                problems.append(f"layer {name!r} does not exist in the denoiser")
            elif kind is None:
                kind_name = f"{type(module).__module__}.{type(module).__qualname__}"
                problems.append(f"layer {name!r} is a {kind_name} now, not an nn.Linear or nn.Conv2d (an adapter?)")
            elif tuple(kind.weight_shape(module)) != tuple(shape):
                actual = tuple(kind.weight_shape(module))
                problems.append(f"layer {name!r} has weight shape {actual}, the {self.DESCRIPTION} {tuple(shape)}")
        if problems:
            raise ValueError(f"These {self.DESCRIPTION} do not fit the denoiser: " + "; ".join(problems[:5]) + ".")
        recorded, actual = self.metadata.model, task.provenance()
        if recorded.fingerprint != actual.fingerprint and not force:
            raise ValueError(
                f"These {self.DESCRIPTION} were computed on another model ({recorded.mismatch(actual)}): the "
                "denoiser's weights differ. Compute them again for this model, or pass force=True if you know the "
                "difference does not matter."
            )


# ---------------------------------------------------------------------------- output folders


def check_output_folder(directory: Path, format_name: str, description: str, overwrite: bool) -> set[str]:
    """Before anything is written: the data files an earlier save of the same artifact recorded there (to replace),
    or a refusal naming what the folder holds when it is something else (unless `overwrite`)."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a folder: choose a folder to save the {description} in.")
    if not directory.is_dir() or not any(directory.iterdir()):
        return set()
    config = directory / CONFIG_NAME
    recorded = _read_json(config) if config.is_file() else None
    if isinstance(recorded, dict) and recorded.get("format") == format_name and isinstance(recorded.get("files"), dict):
        return set(recorded["files"])
    if overwrite:
        return set()
    raise FileExistsError(
        f"{directory} already holds {describe_folder(directory)}; saving {description} there would replace its "
        "files. Choose an empty or new folder, or pass overwrite=True (--overwrite)."
    )


def describe_folder(directory: Path) -> str:
    """What a folder holds, in words: an hf_influence artifact, a diffusers pipeline or model, a dataset, or files."""
    config = _read_json(directory / CONFIG_NAME) if (directory / CONFIG_NAME).is_file() else None
    if isinstance(config, dict) and str(config.get("format", "")).startswith(FORMAT_PREFIX):
        return f"an hf_influence artifact ({config['format']})"
    if (directory / "model_index.json").is_file():
        return "a diffusers pipeline"
    if isinstance(config, dict) and "_class_name" in config:
        return f"a diffusers model ({config['_class_name']})"
    if (directory / "dataset_info.json").is_file() or (directory / "dataset_dict.json").is_file():
        return "a dataset"
    names = sorted(path.name for path in directory.iterdir())
    return f"other files ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


# ---------------------------------------------------------------------------- metadata layout


def metadata_json(metadata: Any) -> dict[str, Any]:
    """The metadata's fields as JSON; a field whose dataclass metadata says `flatten` puts its own fields at the
    top level (a config's settings beside what was computed with them, as config.json has always held them)."""
    data = to_json(metadata)
    for item in _flattened_fields(type(metadata)):
        data.update(data.pop(item.name))
    return data


def metadata_from_json(cls: type, data: dict[str, Any], where: str) -> Any:
    """The inverse of `metadata_json`: flattened fields are collected back from the top level."""
    data = dict(data)
    hints = typing.get_type_hints(cls)
    for item in _flattened_fields(cls):
        names = {inner.name for inner in dataclasses.fields(hints[item.name])}
        data[item.name] = {name: data.pop(name) for name in list(data) if name in names}
    return from_json(cls, data, where)


def _flattened_fields(cls: type) -> list[dataclasses.Field]:
    return [item for item in dataclasses.fields(cls) if item.metadata.get("flatten")]
