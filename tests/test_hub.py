"""Factors, indices, pipelines and datasets through the local Hub (tests/hub_server.py), driven only by the real
`huggingface_hub` / `diffusers` / `datasets` clients: round trips, revisions, provenance, offline, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch
from conftest import mnist_dataset, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from huggingface_hub import ModelCard, constants

import hf_influence as hfi
from hf_influence.datasets_io import resolve_dataset_source


def repo_name(kind: str) -> str:
    return f"hub-tester/{kind}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def fitted():
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    dataset = mnist_dataset(12, 8)
    factors = hfi.fit_factors(task, dataset, hfi.FactorConfig(draws_per_example=2, batch_size=8))
    return task, dataset, factors


@pytest.fixture(scope="module")
def on_hub(hub, tmp_path_factory):
    """A pipeline and a dataset pushed to the local Hub, and the task and stream read back from it by id."""
    pipeline_repo, dataset_repo = repo_name("ddpm"), repo_name("digits")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).push_to_hub(pipeline_repo, token=hub.token)
    mnist_dataset(12, 8).push_to_hub(dataset_repo, token=hub.token)
    task = hfi.DiffusionTask.from_pretrained(pipeline_repo)
    source = resolve_dataset_source(dataset_repo, "train")
    stream = datasets.load_dataset(dataset_repo, split="train", streaming=True, revision=source.revision)
    return task, stream, source, pipeline_repo, dataset_repo


def test_factors_round_trip_by_repo_id_and_older_revision(hub, fitted):
    task, dataset, factors = fitted
    repo = repo_name("factors")
    first = factors.push_to_hub(repo, token=hub.token, max_shard_size=20_000)
    loaded = hfi.InfluenceFactors.from_pretrained(repo, task=task, token=hub.token)
    torch.testing.assert_close(loaded.tensors, factors.tensors, rtol=0, atol=0)
    files = hub.api.list_repo_files(repo)
    assert "factors.safetensors.index.json" in files and sum(name.startswith("factors-") for name in files) > 2

    kfac = hfi.fit_factors(task, dataset, hfi.FactorConfig(strategy="kfac", draws_per_example=2, batch_size=8))
    kfac.push_to_hub(repo, token=hub.token)  # one file now: the old shards go in the same commit
    assert [name for name in hub.api.list_repo_files(repo) if "factors" in name] == ["factors.safetensors"]
    assert hfi.InfluenceFactors.from_pretrained(repo, token=hub.token).strategy == "kfac"
    old = hfi.InfluenceFactors.from_pretrained(repo, revision=first.oid, token=hub.token)
    assert old.strategy == "ekfac"
    torch.testing.assert_close(old.tensors, factors.tensors, rtol=0, atol=0)


def test_a_module_subset_downloads_only_its_shards(hub, fitted):
    _, _, factors = fitted
    repo = repo_name("factors")
    factors.push_to_hub(repo, token=hub.token, max_shard_size=20_000)
    start = len(hub.requests)
    subset = hfi.InfluenceFactors.from_pretrained(repo, modules=factors.modules[:1], token=hub.token)
    downloaded = {path.rsplit("/", 1)[-1] for method, path, _ in hub.requests[start:] if "/resolve/" in path}
    weight_map = json.loads(Path(hub.api.hf_hub_download(repo, "factors.safetensors.index.json")).read_text())
    module = factors.modules[0]
    needed = {weight_map["weight_map"][name] for name in factors.tensors if name.startswith(f"{module}.")}
    assert subset.modules == [module] and len(weight_map["weight_map"]) > len(needed)
    assert downloaded == {"config.json", "factors.safetensors.index.json", *needed}


def test_pipeline_and_dataset_from_the_hub_feed_fitting_and_indexing(hub, on_hub, tmp_path):
    task, stream, source, pipeline_repo, dataset_repo = on_hub
    assert task.source.repo_id == pipeline_repo and len(task.source.revision) == 40
    factors = hfi.fit_factors(task, stream, hfi.FactorConfig(draws_per_example=1, batch_size=8), dataset_source=source)
    index = hfi.build_index(
        task, stream, hfi.IndexConfig(draws_per_example=2, shard_size=5), tmp_path, dataset_source=source
    )
    assert len(index) == 12 and index.ids().tolist() == list(range(12))
    for metadata in (factors.metadata, index.metadata):
        assert metadata.model.repo_id == pipeline_repo
        assert metadata.model.revision == task.source.revision
        expected = hfi.DatasetSource(repo_id=dataset_repo, revision=source.revision, split="train", id_column="id")
        assert replace(metadata.dataset, digest=None) == expected and metadata.dataset.digest  # the rows read
    assert factors.metadata.dataset.digest == index.metadata.dataset.digest  # the same 12 rows
    assert source.revision == hub.api.dataset_info(dataset_repo).sha

    factors_repo, index_repo = repo_name("factors"), repo_name("index")
    factors.push_to_hub(factors_repo, token=hub.token)
    index.push_to_hub(index_repo, token=hub.token, private=True)
    card = ModelCard.load(factors_repo)
    assert card.data.library_name == "hf_influence" and card.data.base_model == pipeline_repo
    assert card.data.datasets == [dataset_repo]
    assert f'InfluenceFactors.from_pretrained("{factors_repo}")' in card.text and task.source.revision in card.text
    assert "hub-tester" in hub.api.dataset_info(index_repo, token=hub.token).id
    with pytest.raises(FileNotFoundError, match="private"):
        hfi.GradientIndex.from_pretrained(index_repo)  # no token: a private repo looks missing

    attributor = hfi.Attributor.from_pretrained(
        pipeline=pipeline_repo, factors=factors_repo, index=index_repo, token=hub.token
    )
    local = hfi.Attributor(task, factors, index)
    queries = torch.zeros(1, 1, 8, 8)
    torch.testing.assert_close(
        attributor.attribute(queries, top_k=3, draws_per_query=2).scores,
        local.attribute(queries, top_k=3, draws_per_query=2).scores,
    )


def test_index_round_trip_downloads_only_config_and_shards(hub, tmp_path):
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    dataset = mnist_dataset(10, 8)
    index = hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=2, shard_size=4), tmp_path / "index")
    repo = repo_name("index")
    index.push_to_hub(repo, token=hub.token)
    assert sorted(hub.api.list_repo_files(repo, repo_type="dataset")) == [
        ".gitattributes",
        "README.md",
        "config.json",
        *(f"index-{number:05d}-of-00003.safetensors" for number in range(3)),
    ]
    start = len(hub.requests)
    loaded = hfi.GradientIndex.from_pretrained(repo, token=hub.token)
    downloaded = sorted(path.rsplit("/", 1)[-1] for _, path, _ in hub.requests[start:] if "/resolve/" in path)
    assert "README.md" not in downloaded and "config.json" in downloaded
    assert loaded.ids().tolist() == index.ids().tolist()
    for (ids, stored), (expected_ids, expected) in zip(loaded.iter_shards(), index.iter_shards(), strict=True):
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(stored, expected, rtol=0, atol=0)


def test_offline_loads_from_the_cache_with_the_hub_down(hub, fitted, monkeypatch):
    task, _, factors = fitted
    repo = repo_name("factors")
    factors.push_to_hub(repo, token=hub.token)
    hfi.InfluenceFactors.from_pretrained(repo, token=hub.token)  # into the cache
    with hub.stopped():
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        loaded = hfi.InfluenceFactors.from_pretrained(repo, task=task)
        torch.testing.assert_close(loaded.tensors, factors.tensors, rtol=0, atol=0)
        with pytest.raises(FileNotFoundError, match="not in the local Hub cache"):
            hfi.InfluenceFactors.from_pretrained(repo_name("never-downloaded"))


def test_refusals_name_the_problem(hub, fitted):
    _, _, factors = fitted
    with pytest.raises(FileNotFoundError, match="no model repo"):
        hfi.InfluenceFactors.from_pretrained(repo_name("missing"))
    with pytest.raises(FileNotFoundError, match="no revision"):
        repo = repo_name("factors")
        factors.push_to_hub(repo, token=hub.token)
        hfi.InfluenceFactors.from_pretrained(repo, revision="no-such-branch", token=hub.token)

    not_factors = repo_name("not-factors")
    hub.api.create_repo(not_factors)
    hub.api.upload_file(path_or_fileobj=b"# hello\n", path_in_repo="README.md", repo_id=not_factors)
    with pytest.raises(FileNotFoundError, match=r"has no file 'config\.json'"):
        hfi.InfluenceFactors.from_pretrained(not_factors, token=hub.token)

    other_model = hfi.DiffusionTask(tiny_unet(seed=3), DDPMScheduler())
    with pytest.raises(ValueError, match="fingerprint"):
        hfi.InfluenceFactors.from_pretrained(repo, task=other_model, token=hub.token)

    truncated = repo_name("factors")
    factors.push_to_hub(truncated, token=hub.token)
    hub.truncate(truncated, "factors.safetensors", 1000)
    with pytest.raises(ValueError, match="truncated"):
        hfi.InfluenceFactors.from_pretrained(truncated, token=hub.token)


def test_the_cli_pushes_and_reads_hub_ids(hub, on_hub, tmp_path, monkeypatch):
    from hf_influence.cli import main

    _, _, _, pipeline_repo, dataset_repo = on_hub
    monkeypatch.setenv("HF_TOKEN", hub.token)
    factors_repo = repo_name("factors")
    common = ["--pipeline", pipeline_repo, "--dataset", dataset_repo, "--streaming"]
    main(["fit-factors", *common, "--output-dir", str(tmp_path / "f"), "--draws-per-example", "1",
          "--push-to-hub", factors_repo])  # fmt: skip
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["dataset"]["repo_id"] == dataset_repo and config["model"]["repo_id"] == pipeline_repo
    assert "config.json" in hub.api.list_repo_files(factors_repo)
    index_repo = repo_name("index")
    main(["build-index", *common, "--output-dir", str(tmp_path / "i"), "--num-draws", "2", "--push-to-hub",
          index_repo])  # fmt: skip
    main(["attribute", *common, "--factors", factors_repo, "--index", index_repo, "--generate", "1",
          "--num-inference-steps", "2", "--top-k", "2", "--output-dir", str(tmp_path / "a")])  # fmt: skip
    summary = json.loads((tmp_path / "a" / "attribution.json").read_text())
    assert len(summary["queries"][0]["proponents"]["ids"]) == 2


def test_train_ddpm_pushes_the_pipeline_without_checkpoints(hub, on_hub, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from hf_influence.cli import main

    _, _, _, _, dataset_repo = on_hub
    monkeypatch.setenv("HF_TOKEN", hub.token)
    repo = repo_name("ddpm")
    options = "--resolution 8 --channels 1 --block-out-channels 8 16 --layers-per-block 1 --norm-num-groups 4"
    main(["train-ddpm", dataset_repo, "--output-dir", str(tmp_path), "--max-steps", "2", "--checkpoint-every", "1",
          *options.split(), "--push-to-hub", repo])  # fmt: skip
    files = hub.api.list_repo_files(repo)
    assert "model_index.json" in files and "training_config.json" in files
    assert not any(name.startswith("checkpoints/") for name in files) and (tmp_path / "checkpoints").is_dir()
    pushed = DiffusionPipeline.from_pretrained(repo)
    local = DiffusionPipeline.from_pretrained(tmp_path)
    torch.testing.assert_close(pushed.unet.state_dict(), local.unet.state_dict(), rtol=0, atol=0)


def test_ground_truth_repo_with_its_models_and_the_lds_command(hub, tmp_path):
    """The benchmark as a Hub dataset repo: the ground truth and its retrained models pushed, loaded back by
    repo id, and `hf-influence lds --ground-truth REPO --scores FILE` scoring a matrix in one line."""
    from safetensors.torch import save_file

    from hf_influence.evaluation import GroundTruth, GroundTruthProtocol, lds, random_subsets

    generator = torch.Generator().manual_seed(0)
    subsets = random_subsets(20, alpha=0.5, count=6, seed=0)
    protocol = GroundTruthProtocol(alpha=0.5, seeds=(0, 1), draws_per_query=16, subset_seed=0, dataset="20 digits")
    measurements = torch.randn(6, 2, 3, generator=generator, dtype=torch.float64)
    ground_truth = GroundTruth(subsets, measurements, torch.rand(3, 1, 8, 8) * 2 - 1, protocol)
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    for k in range(6):
        for seed in (0, 1):
            pipeline.save_pretrained(tmp_path / "models" / f"subset-{k:04d}" / f"seed-{seed}")
    (tmp_path / "models" / "subset-0000" / "seed-0" / "checkpoints").mkdir()
    (tmp_path / "models" / "subset-0000" / "seed-0" / "checkpoints" / "state.bin").write_bytes(b"left out")

    repo = repo_name("lds")
    ground_truth.push_to_hub(repo, token=hub.token)
    ground_truth.push_models_to_hub(repo, tmp_path / "models", token=hub.token)
    files = set(hub.api.list_repo_files(repo, repo_type="dataset"))
    assert "models/subset-0005/seed-1/unet/diffusion_pytorch_model.safetensors" in files
    assert not any("checkpoints" in name for name in files)
    card = Path(hub.api.hf_hub_download(repo, "README.md", repo_type="dataset")).read_text()
    assert "| training seeds per subset | 2: 0, 1 |" in card and f"--ground-truth {repo}" in card

    loaded = GroundTruth.from_pretrained(repo)
    assert torch.equal(loaded.subsets, subsets) and torch.equal(loaded.measurements, measurements)
    assert loaded.protocol == protocol
    scores = torch.randn(3, 20, generator=generator)
    save_file({"mine": scores}, str(tmp_path / "scores.safetensors"))
    done = subprocess.run(
        ["hf-influence", "lds", "--ground-truth", repo, "--scores", str(tmp_path / "scores.safetensors"),
         "--output", str(tmp_path / "lds.json")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "lds.json").read_text())["mine"]["mean"] == pytest.approx(
        lds(scores, ground_truth).mean, abs=1e-12
    )
    with pytest.raises(FileNotFoundError, match="lacks the retrained pipelines"):
        ground_truth.push_models_to_hub(repo, tmp_path / "nothing", token=hub.token)
