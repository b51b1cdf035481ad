"""Factors and indices as Hub repos: push a saved folder, fetch only the files a loader needs.

Everything goes through the real `huggingface_hub` client (`create_repo`, `upload_folder`,
`hf_hub_download`), so tokens, private repos, `HF_ENDPOINT`, `HF_HOME` and `HF_HUB_OFFLINE` work as
everywhere else in the ecosystem. A name that is an existing local folder is read in place; anything
else is a Hub repo id. Hub errors are turned into messages that say what is missing and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .provenance import ModelSource

CACHE_SNAPSHOTS = "snapshots"  # huggingface_hub caches each commit under snapshots/<commit>/


@dataclass
class RepoFiles:
    """Files of one saved folder: a local directory, or a Hub repo pinned to one commit.

    `fetch(name)` returns a local path, downloading from the Hub (or reading the cache) on first use,
    so a loader downloads only what it reads: config.json first, then the shards it lists.
    """

    source: str
    repo_type: str
    revision: str | None  # the resolved commit for a Hub repo; None for a local folder
    local_directory: Path | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False

    @property
    def is_local(self) -> bool:
        return self.local_directory is not None

    def fetch(self, name: str, expected_size: int | None = None) -> Path:
        """The local path of file `name`; with `expected_size`, refuse a truncated or altered file."""
        if self.local_directory is not None:
            path = self.local_directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{self.local_directory} has no file {name!r}: the folder is incomplete.")
        else:
            path = Path(self._download(name, self.revision))
        if expected_size is not None and path.stat().st_size != expected_size:
            where = "file" if self.is_local else "download"
            raise ValueError(
                f"{name} from {self.describe()} has {path.stat().st_size} bytes, {expected_size} expected: the "
                f"{where} is truncated or corrupt."
                + ("" if self.is_local else " Delete it from the cache (or pass force_download) and try again.")
            )
        return path

    def describe(self) -> str:
        if self.local_directory is not None:
            return str(self.local_directory)
        return f"the Hub {self.repo_type} repo {self.source!r} at revision {self.revision}"

    def _download(self, name: str, revision: str | None) -> str:
        try:
            return hf_hub_download(
                self.source,
                name,
                repo_type=self.repo_type,
                revision=revision,
                token=self.token,
                cache_dir=self.cache_dir,
                local_files_only=self.local_files_only,
                library_name="hf_influence",
            )
        except RepositoryNotFoundError as error:
            raise FileNotFoundError(
                f"{self.source!r} is not a local folder, and the Hub has no {self.repo_type} repo {self.source!r} "
                "(or it is private: log in with `hf auth login` or pass token=)."
                + (" Indices are dataset repos by default." if self.repo_type == "model" else "")
            ) from error
        except RevisionNotFoundError as error:
            raise FileNotFoundError(
                f"The {self.repo_type} repo {self.source!r} has no revision {revision!r}."
            ) from error
        # LocalEntryNotFoundError is a subclass of EntryNotFoundError: it must come first.
        except LocalEntryNotFoundError as error:
            raise FileNotFoundError(
                f"{name} of {self.source!r} is not in the local Hub cache, and the Hub cannot be reached (offline "
                "mode, or no connection). Download it once while online."
            ) from error
        except EntryNotFoundError as error:
            raise FileNotFoundError(
                f"The {self.repo_type} repo {self.source!r} at revision {revision or 'main'} has no file {name!r}: "
                "it is not a complete hf_influence repo."
            ) from error


def is_repo_id(name: str) -> bool:
    """Whether `name` is a valid Hub repo id (by the Hub client's rules)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_local_or_repo_id(path_or_repo_id: str | os.PathLike, what: str) -> None:
    """Refuse, before any download, a name that can only be a local path but names nothing: "no such folder"
    rather than the Hub client's repo-id rules. A name that exists, or could be a Hub id, passes."""
    name = str(path_or_repo_id)
    if not Path(name).exists() and not is_repo_id(name):
        raise FileNotFoundError(f"No such folder: {name} (the {what}; a Hub repo id looks like 'owner/name').")


def open_repo(
    path_or_repo_id: str | os.PathLike,
    repo_type: str,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> RepoFiles:
    """A local folder as is, or a Hub repo resolved to one commit by downloading its config.json.

    Pinning the commit first means every later file comes from the same revision, even if someone
    pushes in between.
    """
    local = Path(path_or_repo_id)
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"{local} is a local folder: it has no revisions (revision={revision!r}).")
        return RepoFiles(str(local), repo_type, None, local_directory=local)
    if local.exists():
        raise NotADirectoryError(f"{local} is a file, not a saved folder or a Hub repo id.")
    check_local_or_repo_id(path_or_repo_id, f"saved folder with a config.json, or Hub {repo_type} repo")
    repo = RepoFiles(str(path_or_repo_id), repo_type, revision, None, token, cache_dir, local_files_only)
    config = Path(repo._download("config.json", revision))
    repo.revision = _cached_commit(config) or revision
    return repo


def download_pipeline(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> tuple[str, ModelSource]:
    """A diffusers pipeline's local folder and where it came from: a Hub repo is downloaded (or read from the
    cache) and its revision resolved to the commit it was read at."""
    from huggingface_hub import snapshot_download

    if Path(path_or_repo_id).is_dir():
        return str(path_or_repo_id), ModelSource(str(path_or_repo_id), None)
    check_local_or_repo_id(path_or_repo_id, "pipeline folder or Hub model repo")
    try:
        folder = snapshot_download(str(path_or_repo_id), revision=revision, token=token, library_name="hf_influence")
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"{path_or_repo_id!r} is neither a local pipeline folder nor a Hub model repo (or it is private: log in "
            "or pass token=)."
        ) from error
    except RevisionNotFoundError as error:
        raise FileNotFoundError(f"The pipeline repo {path_or_repo_id!r} has no revision {revision!r}.") from error
    return folder, ModelSource(str(path_or_repo_id), _cached_commit(Path(folder)))


def _cached_commit(path: Path) -> str | None:
    """The commit a cached file or snapshot folder belongs to: the snapshot folder's name
    (…/snapshots/<commit>/…)."""
    for folder in (path, *path.parents):
        if folder.parent.name == CACHE_SNAPSHOTS:
            return folder.name
    return None


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    repo_type: str,
    files: Iterable[str] | None = None,
    ignore: Iterable[str] = (),
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    stale_patterns: Iterable[str] = (),
    space_sdk: str | None = None,
) -> Any:
    """Create the repo if needed (a Space with `space_sdk`) and upload `files` of `folder` (all but `ignore`
    patterns when None) in one commit; returns its `CommitInfo`.

    `stale_patterns` name remote files of an older save that this one replaces (e.g. shards of another
    count): they are deleted in the same commit unless uploaded again.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, space_sdk=space_sdk)
    if revision is not None and not create_pr:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type=repo_type,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        allow_patterns=None if files is None else list(files),
        ignore_patterns=list(ignore) or None,
        delete_patterns=list(stale_patterns) or None,
    )
