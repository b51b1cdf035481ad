"""The local Hub of the test suite (tests/hub_server.py), driven only through the real clients: `huggingface_hub`,
`diffusers` and `datasets` must upload to it and read back exactly what they wrote, with the Hub's errors."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import httpx2
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from hub_server import USER
from huggingface_hub import (
    HfApi,
    HfFileSystem,
    RepoFile,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

from hf_influence.data import mnist_demo_dataset


def new_repo_id() -> str:
    return f"{USER}/test-{uuid.uuid4().hex[:12]}"


def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def git_blob_id(data: bytes) -> str:
    """Independent of the server's: `git hash-object` of a blob."""
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def write_model_folder(folder: Path, version: int) -> dict[str, bytes]:
    """A safetensors weight file (LFS on the Hub), a JSON config and a card (plain git), one file in a subfolder."""
    folder.mkdir(parents=True)
    torch.manual_seed(version)
    save_file({"weight": torch.randn(32, 32), "bias": torch.randn(32)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"version": version}))
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- test\n---\n# A test repo\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.txt").write_text(f"notes of version {version}\n")
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_every_client_points_at_the_local_hub(hub):
    """The HF libraries read these at import: conftest.py must have set them before any of them was imported."""
    import datasets.config
    from diffusers.utils.constants import HUGGINGFACE_CO_RESOLVE_ENDPOINT

    endpoints = [constants.ENDPOINT, datasets.config.HF_ENDPOINT, HUGGINGFACE_CO_RESOLVE_ENDPOINT]
    assert endpoints == [hub.endpoint] * 3
    assert constants.HF_HUB_DISABLE_XET
    assert Path(constants.HF_HUB_CACHE).is_relative_to(os.environ["HF_HOME"])
    assert Path(datasets.config.HF_DATASETS_CACHE).is_relative_to(os.environ["HF_HOME"])
    assert hub.api.whoami()["name"] == USER


def test_upload_download_history_and_errors(hub, tmp_path):
    api = hub.api
    repo_id = new_repo_id()
    url = api.create_repo(repo_id, private=True)
    assert url.repo_id == repo_id and url.repo_type == "model"
    assert api.create_repo(repo_id, private=True, exist_ok=True).repo_id == repo_id
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(repo_id)
    assert conflict.value.response.status_code == 409

    files = write_model_folder(tmp_path / "v1", version=1)
    first = api.upload_folder(folder_path=tmp_path / "v1", repo_id=repo_id, commit_message="version 1")
    assert len(first.oid) == 40

    # Stored like the Hub stores them: the weights in LFS (sha256), text files as git blobs.
    tree = {entry.path: entry for entry in api.list_repo_tree(repo_id, recursive=True) if isinstance(entry, RepoFile)}
    assert set(tree) == {".gitattributes", *files}
    weights = tree["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert weights.size == len(files["model.safetensors"])
    assert tree["config.json"].lfs is None and tree["config.json"].blob_id == git_blob_id(files["config.json"])
    folders = [entry.path for entry in api.list_repo_tree(repo_id) if not isinstance(entry, RepoFile)]
    assert folders == ["sub"]

    # Downloads are byte-equal; snapshot_download honours allow_patterns.
    assert read(hf_hub_download(repo_id, "model.safetensors", token=hub.token)) == files["model.safetensors"]
    snapshot = Path(
        snapshot_download(repo_id, allow_patterns=["*.json", "sub/*"], token=hub.token, cache_dir=tmp_path / "cache")
    )
    downloaded = {str(path.relative_to(snapshot)): path.read_bytes() for path in snapshot.rglob("*") if path.is_file()}
    assert downloaded == {name: files[name] for name in ("config.json", "sub/notes.txt")}

    # Random access (HTTP Range) through the fsspec file system that `datasets` streams with.
    with HfFileSystem(token=hub.token).open(f"{repo_id}/model.safetensors", "rb") as remote:
        remote.seek(100)
        assert remote.read(50) == files["model.safetensors"][100:150]

    # A second commit changes a file, a third deletes one; old revisions keep the old content.
    second = api.upload_file(path_or_fileobj=b'{"version": 2}', path_in_repo="config.json", repo_id=repo_id)
    third = api.delete_file("sub/notes.txt", repo_id=repo_id, commit_message="drop the notes")
    assert read(hf_hub_download(repo_id, "config.json", token=hub.token)) == b'{"version": 2}'
    old = hf_hub_download(repo_id, "config.json", revision=first.oid, token=hub.token)
    assert read(old) == files["config.json"]
    assert api.list_repo_files(repo_id) == [".gitattributes", "README.md", "config.json", "model.safetensors"]
    assert not api.file_exists(repo_id, "sub/notes.txt")
    assert api.file_exists(repo_id, "sub/notes.txt", revision=first.oid)
    assert api.repo_info(repo_id).sha == third.oid
    info = api.repo_info(repo_id, revision=first.oid, files_metadata=True)
    assert info.sha == first.oid and info.private
    assert {sibling.rfilename for sibling in info.siblings} == {".gitattributes", *files}
    assert next(s for s in info.siblings if s.rfilename == "model.safetensors").lfs.size == weights.size

    commits = api.list_repo_commits(repo_id)
    assert [commit.commit_id for commit in commits][:3] == [third.oid, second.oid, first.oid]
    assert [commit.title for commit in commits] == [
        "drop the notes",
        "Upload config.json with huggingface_hub",
        "version 1",
        "initial commit",
    ]

    # A stale parent commit is refused, as the Hub does for concurrent writers.
    with pytest.raises(HfHubHTTPError) as stale:
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, parent_commit=first.oid)
    assert stale.value.response.status_code == 412

    # Branches and tags resolve like any revision.
    api.create_branch(repo_id, branch="v1-fixes", revision=first.oid)
    api.create_tag(repo_id, tag="v1.0", revision=first.oid)
    refs = api.list_repo_refs(repo_id)
    assert {(ref.name, ref.target_commit) for ref in refs.branches} == {("main", third.oid), ("v1-fixes", first.oid)}
    assert [(ref.name, ref.target_commit) for ref in refs.tags] == [("v1.0", first.oid)]
    assert read(hf_hub_download(repo_id, "sub/notes.txt", revision="v1.0", token=hub.token)) == files["sub/notes.txt"]

    # The errors the client maps from X-Error-Code.
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", token=hub.token)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch", token=hub.token)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{USER}/no-such-repo", "config.json", token=hub.token)
    # A private repo is invisible without the token.
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.repo_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "README.md", token=False, cache_dir=tmp_path / "anonymous-cache")
    with pytest.raises(HfHubHTTPError):
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    api.update_repo_settings(repo_id, private=False)
    assert not anonymous.repo_info(repo_id).private

    # Dataset repos live in their own namespace of URLs.
    dataset_id = new_repo_id()
    api.create_repo(dataset_id, repo_type="dataset", private=True)
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data.csv", repo_id=dataset_id, repo_type="dataset")
    csv = hf_hub_download(dataset_id, "data.csv", repo_type="dataset", token=hub.token)
    assert read(csv) == b"a,b\n1,2\n"
    assert not api.repo_exists(dataset_id)  # not a model
    assert api.repo_exists(dataset_id, repo_type="dataset")

    api.delete_repo(repo_id)
    api.delete_repo(dataset_id, repo_type="dataset")
    assert not api.repo_exists(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo_id)
    api.delete_repo(repo_id, missing_ok=True)


def test_diffusers_pipeline_round_trip(hub):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50))
    repo_id = new_repo_id()
    pipe.push_to_hub(repo_id, token=hub.token, private=True)

    files = hub.api.list_repo_files(repo_id)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= set(
        files
    )
    loaded = DiffusionPipeline.from_pretrained(repo_id, token=hub.token)
    assert isinstance(loaded, DDPMPipeline)
    assert loaded.scheduler.config.num_train_timesteps == 50
    expected, actual = unet.state_dict(), loaded.unet.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)


def test_datasets_round_trip(hub):
    from datasets import load_dataset

    dataset = mnist_demo_dataset(20, 8)
    repo_id = new_repo_id()
    # A bare name goes to the token owner's namespace, as on the Hub.
    dataset.push_to_hub(repo_id.split("/")[1], token=hub.token, private=True)
    assert any(name.endswith(".parquet") for name in hub.api.list_repo_files(repo_id, repo_type="dataset"))

    def same_rows(rows) -> None:
        rows = list(rows)
        assert [row["id"] for row in rows] == dataset["id"]
        assert [row["label"] for row in rows] == dataset["label"]
        for row, image in zip(rows, dataset["image"], strict=True):
            np.testing.assert_array_equal(np.asarray(row["image"]), np.asarray(image))

    same_rows(load_dataset(repo_id, split="train", streaming=True, token=hub.token))
    same_rows(load_dataset(repo_id, split="train", token=hub.token))


def test_offline_loads_from_cache_then_hub_restarts(hub, monkeypatch):
    api = hub.api
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"cached", path_in_repo="cached.txt", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"never downloaded", path_in_repo="remote.txt", repo_id=repo_id)
    cached = hf_hub_download(repo_id, "cached.txt")
    snapshot = snapshot_download(repo_id, allow_patterns=["cached.txt"])

    with hub.stopped():
        with pytest.raises(httpx2.ConnectError):  # the Hub is down
            api.repo_info(repo_id)
        # Without the offline flag the client falls back to its cache when the Hub cannot be reached.
        assert hf_hub_download(repo_id, "cached.txt") == cached
        # huggingface_hub reads HF_HUB_OFFLINE into `constants.HF_HUB_OFFLINE` at import, and that constant at call
        # time: setting the environment variable now would change nothing.
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert hf_hub_download(repo_id, "cached.txt") == cached
        assert snapshot_download(repo_id, allow_patterns=["cached.txt"]) == snapshot
        with pytest.raises(LocalEntryNotFoundError):
            hf_hub_download(repo_id, "remote.txt")

    # Back up on the same port with the same repos. Offline mode still sends nothing to the Hub.
    served = len(hub.requests)
    assert hf_hub_download(repo_id, "cached.txt") == cached
    with pytest.raises(OfflineModeIsEnabled):
        api.repo_info(repo_id)
    assert len(hub.requests) == served
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert read(hf_hub_download(repo_id, "remote.txt")) == b"never downloaded"
    assert len(hub.requests) > served


def test_truncate_serves_a_short_file_with_consistent_headers(hub):
    api = hub.api
    repo_id = new_repo_id()
    api.create_repo(repo_id)
    weights, config = bytes(range(256)) * 8, b'{"size": 2048}'
    api.upload_file(path_or_fileobj=weights, path_in_repo="weights.bin", repo_id=repo_id)
    api.upload_file(path_or_fileobj=config, path_in_repo="config.json", repo_id=repo_id)

    hub.truncate(repo_id, "weights.bin", 100)
    hub.truncate(repo_id, "config.json", 5)
    assert read(hf_hub_download(repo_id, "weights.bin")) == weights[:100]
    assert read(hf_hub_download(repo_id, "config.json")) == config[:5]
    # The listing keeps the true sizes: what a loader checks a download against.
    sizes = {entry.path: entry.size for entry in api.get_paths_info(repo_id, ["weights.bin", "config.json"])}
    assert sizes == {"weights.bin": len(weights), "config.json": len(config)}

    hub.restore(repo_id, "weights.bin")
    assert read(hf_hub_download(repo_id, "weights.bin", force_download=True)) == weights
