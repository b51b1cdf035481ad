"""Fitting end to end on real digits: format, round trip, reproducibility and refusals."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from safetensors.torch import load_file

import hf_influence as hfi


def assert_same_covariances(left: hfi.InfluenceFactors, right: hfi.InfluenceFactors) -> None:
    """Covariances must agree; eigenvectors are compared through them (they are unique only up to
    sign and rotations within repeated eigenvalues)."""
    assert left.modules == right.modules
    for name, value in right.tensors.items():
        if name.endswith("covariance"):
            torch.testing.assert_close(left.tensors[name], value, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def fitted(request):
    from conftest import mnist_dataset

    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    dataset = mnist_dataset(12, 8)
    factors = hfi.fit_factors(task, dataset, hfi.FactorConfig(draws_per_example=2, batch_size=8))
    return task, dataset, factors


def test_saved_format_follows_the_contract(fitted, tmp_path):
    task, _, factors = fitted
    factors.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "hf_influence.factors" and config["format_version"] == 2
    assert (config["strategy"], config["approx"], config["ggn"]) == ("ekfac", "expand", "model")
    assert config["total_draws"] == 12 * 2
    assert config["model"]["fingerprint"] == task.fingerprint()
    layers = [name for name, m in task.denoiser.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert config["modules"] == layers
    tensors = load_file(tmp_path / "factors.safetensors")
    conv = task.denoiser.conv_in
    assert tensors["conv_in.activation_covariance"].shape == (9, 9)
    assert tensors["conv_in.gradient_covariance"].shape == (conv.out_channels, conv.out_channels)
    assert tensors["conv_in.eigenvalues"].shape == (conv.out_channels, 9)
    assert tensors["conv_in.bias_eigenvalues"].shape == (conv.out_channels,)
    assert "library_name: hf_influence" in (tmp_path / "README.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_kfac_factors_round_trip(fitted, tmp_path):
    task, dataset, _ = fitted
    factors = hfi.fit_factors(task, dataset, hfi.FactorConfig(strategy="kfac"))
    factors.save_pretrained(tmp_path)
    loaded = hfi.InfluenceFactors.from_pretrained(tmp_path, task=task)
    torch.testing.assert_close(loaded.tensors, factors.tensors, rtol=0, atol=0)


def test_round_trip_gives_equal_tensors_and_scores(fitted, tmp_path):
    task, dataset, factors = fitted
    factors.save_pretrained(tmp_path)
    loaded = hfi.InfluenceFactors.from_pretrained(tmp_path, task=task)
    assert dataclasses.replace(loaded.metadata, storage=factors.metadata.storage) == factors.metadata
    for name, value in factors.tensors.items():
        torch.testing.assert_close(loaded.tensors[name], value, rtol=0, atol=0)
    queries = task.preprocess([dataset[0]["image"]])
    kwargs = dict(draws_per_query=2, draws_per_example=2, batch_size=8)
    torch.testing.assert_close(
        hfi.pairwise_scores(task, loaded, queries, dataset, **kwargs),
        hfi.pairwise_scores(task, factors, queries, dataset, **kwargs),
    )


def test_factors_and_scores_do_not_depend_on_batch_size(fitted):
    task, dataset, factors = fitted
    other = hfi.fit_factors(task, dataset, hfi.FactorConfig(draws_per_example=2, batch_size=3))
    assert_same_covariances(other, factors)
    queries = task.preprocess([dataset[i]["image"] for i in range(2)])
    small = hfi.pairwise_scores(task, factors, queries, dataset, draws_per_query=3, draws_per_example=3, batch_size=2)
    large = hfi.pairwise_scores(task, factors, queries, dataset, draws_per_query=3, draws_per_example=3, batch_size=64)
    assert small.shape == (2, 12)
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-4)


def test_streaming_dataset_gives_the_same_factors(fitted):
    task, dataset, factors = fitted
    streamed = hfi.fit_factors(
        task, dataset.to_iterable_dataset(num_shards=3), hfi.FactorConfig(draws_per_example=2, batch_size=8)
    )
    assert_same_covariances(streamed, factors)


def test_factors_of_another_model_are_refused(fitted, tmp_path):
    _, dataset, factors = fitted
    factors.save_pretrained(tmp_path)
    retrained = hfi.DiffusionTask(tiny_unet(seed=1), DDPMScheduler())
    with pytest.raises(ValueError, match="fingerprint"):
        hfi.InfluenceFactors.from_pretrained(tmp_path, task=retrained)
    with pytest.raises(ValueError, match="fingerprint"):
        hfi.pairwise_scores(
            retrained, factors, torch.zeros(1, 1, 8, 8), dataset, draws_per_query=1, draws_per_example=1
        )
    assert hfi.InfluenceFactors.from_pretrained(tmp_path, task=retrained, force=True).modules == factors.modules
    wider = hfi.DiffusionTask(tiny_unet(sample_size=8, channels=3), DDPMScheduler())
    with pytest.raises(ValueError, match="conv_in"):
        hfi.InfluenceFactors.from_pretrained(tmp_path, task=wider, force=True)


def test_corrupt_or_truncated_files_are_refused(fitted, tmp_path):
    _, _, factors = fitted
    factors.save_pretrained(tmp_path)
    weights = tmp_path / "factors.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt"):
        hfi.InfluenceFactors.from_pretrained(tmp_path)
    factors.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        hfi.InfluenceFactors.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        hfi.InfluenceFactors.from_pretrained(tmp_path / "missing")


def test_failed_save_keeps_the_previous_files(fitted, tmp_path, monkeypatch):
    _, _, factors = fitted
    factors.save_pretrained(tmp_path)
    before = (tmp_path / "factors.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("hf_influence.factors.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        factors.save_pretrained(tmp_path)
    assert (tmp_path / "factors.safetensors").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_sharded_save_loads_equal_and_a_subset_reads_only_its_shards(fitted, tmp_path):
    task, _, factors = fitted
    files = factors.save_pretrained(tmp_path, max_shard_size=20_000)
    shards = sorted(name for name in files if name.startswith("factors-"))
    assert len(shards) > 2 and "factors.safetensors.index.json" in files
    weight_map = json.loads((tmp_path / "factors.safetensors.index.json").read_text())["weight_map"]
    for name in shards:  # within the limit (plus the header), unless one tensor alone exceeds it
        assert (tmp_path / name).stat().st_size <= 20_000 + 4096 or list(weight_map.values()).count(name) == 1
    loaded = hfi.InfluenceFactors.from_pretrained(tmp_path, task=task)
    torch.testing.assert_close(loaded.tensors, factors.tensors, rtol=0, atol=0)

    wanted = factors.modules[:2]
    needed = {weight_map[name] for name in weight_map if any(name.startswith(f"{module}.") for module in wanted)}
    for name in set(shards) - needed:
        (tmp_path / name).unlink()  # a subset load must not read these
    subset = hfi.InfluenceFactors.from_pretrained(tmp_path, modules=wanted)
    assert subset.modules == wanted
    for module in wanted:
        torch.testing.assert_close(subset.layer(module).tensors(), factors.layer(module).tensors(), rtol=0, atol=0)
    with pytest.raises(KeyError, match="no layers"):
        hfi.InfluenceFactors.from_pretrained(tmp_path, modules=["not.a.layer"])


def test_resaving_with_fewer_shards_removes_the_stale_ones(fitted, tmp_path):
    _, _, factors = fitted
    factors.save_pretrained(tmp_path, max_shard_size=20_000)
    factors.save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.glob("factors*")) == ["factors.safetensors"]
    torch.testing.assert_close(hfi.InfluenceFactors.from_pretrained(tmp_path).tensors, factors.tensors)


def test_storage_policies_shrink_the_files_and_keep_the_preconditioner(fitted, tmp_path):
    task, _, factors = fitted
    full, lean = tmp_path / "full", tmp_path / "lean"
    factors.save_pretrained(full)
    factors.save_pretrained(lean, keep_covariances=False, eigenvector_dtype="bfloat16")
    size = lambda folder: (folder / "factors.safetensors").stat().st_size  # noqa: E731
    assert size(lean) < 0.45 * size(full)
    loaded = hfi.InfluenceFactors.from_pretrained(lean, task=task)
    assert not any(name.endswith("covariance") for name in loaded.tensors)
    assert json.loads((lean / "config.json").read_text())["storage"] == {
        "covariances": False,
        "eigenvector_dtype": "bfloat16",
    }
    generator = torch.Generator().manual_seed(0)
    for module in factors.modules:
        assert loaded.layer(module).activation_eigenvectors.dtype == torch.float32  # upcast for the maths
        d_out, d_in = factors.metadata.shapes[module]
        gradient = torch.randn(3, d_out, d_in, generator=generator)
        exact, _ = factors.precondition(module, gradient, None, 1e-3)
        approx, _ = loaded.precondition(module, gradient, None, 1e-3)
        assert (approx - exact).norm() <= 0.05 * exact.norm()
    with pytest.raises(ValueError, match="eigenvector_dtype"):
        factors.save_pretrained(tmp_path / "bad", eigenvector_dtype="int8")


def test_memory_mapped_loading_gives_equal_tensors(fitted, tmp_path):
    task, _, factors = fitted
    factors.save_pretrained(tmp_path, eigenvector_dtype="bfloat16")
    mapped = hfi.InfluenceFactors.from_pretrained(tmp_path, task=task, mmap=True)
    read = hfi.InfluenceFactors.from_pretrained(tmp_path, task=task)
    torch.testing.assert_close(mapped.tensors, read.tensors, rtol=0, atol=0)


def test_a_truncated_shard_is_refused_by_its_recorded_size(fitted, tmp_path):
    _, _, factors = fitted
    files = factors.save_pretrained(tmp_path, max_shard_size=20_000)
    shard = tmp_path / next(name for name in files if name.startswith("factors-"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        hfi.InfluenceFactors.from_pretrained(tmp_path)


def test_saved_files_get_the_usual_permissions(fitted, tmp_path):
    _, _, factors = fitted
    factors.save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("factors.safetensors", "config.json", "README.md"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
