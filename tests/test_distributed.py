"""Several processes through `accelerate` give the factors of one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from conftest import mnist_dataset, tiny_unet
from diffusers import DDPMScheduler

import hf_influence as hfi
from hf_influence.compression import Quantized
from hf_influence.distributed import Ranks

# 13 examples: the two ranks get unequal parts (7 and 6).
EXAMPLES = 13
CONFIG = hfi.FactorConfig(draws_per_example=2, batch_size=8, dtype="float64")
STRATEGIES = ("kfac", "ekfac")


def _task() -> hfi.DiffusionTask:
    return hfi.DiffusionTask(tiny_unet().double(), DDPMScheduler())


def _fit_on_every_rank(output_dir: str, streaming: bool) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    dataset = mnist_dataset(EXAMPLES, 8)
    if streaming:
        dataset = dataset.to_iterable_dataset(num_shards=3)  # 3 shards over 2 ranks: uneven
    for strategy in STRATEGIES:
        config = dataclasses.replace(CONFIG, strategy=strategy)
        factors = hfi.fit_factors(_task(), dataset, config, accelerator=accelerator)
        factors.save_pretrained(f"{output_dir}/{strategy}/rank{accelerator.process_index}")


@pytest.mark.parametrize("streaming", [False, True])
def test_two_processes_fit_the_factors_of_one(tmp_path, streaming):
    debug_launcher(_fit_on_every_rank, args=(str(tmp_path), streaming), num_processes=2)
    task = _task()
    queries = task.preprocess([mnist_dataset(EXAMPLES + 2, 8)[EXAMPLES + i]["image"] for i in range(2)])
    for strategy in STRATEGIES:
        single = hfi.fit_factors(task, mnist_dataset(EXAMPLES, 8), dataclasses.replace(CONFIG, strategy=strategy))
        ranks = [hfi.InfluenceFactors.from_pretrained(tmp_path / strategy / f"rank{r}", task=task) for r in (0, 1)]
        assert ranks[0].metadata.total_draws == single.metadata.total_draws == EXAMPLES * 2
        for name, value in single.tensors.items():
            # every rank holds the same factors, eigendecompositions included (computed by one, broadcast)
            torch.testing.assert_close(ranks[0].tensors[name], ranks[1].tensors[name], rtol=0, atol=0)
            if name.endswith("covariance"):
                torch.testing.assert_close(ranks[0].tensors[name], value, rtol=1e-10, atol=1e-14)
        # Compare what the eigenvectors are used for, the preconditioned scores. K-FAC's damped inverse
        # (G ⊗ A + λI)⁻¹ does not depend on the eigenbasis: equal to rounding. EK-FAC's corrected
        # eigenvalues do, within repeated eigenvalues (the null space of a rank-deficient factor, here
        # the time-embedding layers fitted on 26 draws), where rounding picks the basis: close only.
        kwargs = dict(damping=1e-3, draws_per_query=2, draws_per_example=2)
        expected = hfi.pairwise_scores(task, single, queries, mnist_dataset(EXAMPLES, 8), **kwargs)
        actual = hfi.pairwise_scores(task, ranks[0], queries, mnist_dataset(EXAMPLES, 8), **kwargs)
        tolerance = 1e-8 if strategy == "kfac" else 2e-3
        torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def _index_config(compressed: bool) -> hfi.IndexConfig:
    if not compressed:
        return hfi.IndexConfig(draws_per_example=2, shard_size=4)
    return hfi.IndexConfig(draws_per_example=2, shard_size=4, max_bytes_per_example=12_000, search_dim=32)


def _index_on_every_rank(output_dir: str, factors_dir: str | None) -> None:
    torch.set_num_threads(1)
    dataset = mnist_dataset(EXAMPLES, 8).to_iterable_dataset(num_shards=3)
    factors = None if factors_dir is None else hfi.InfluenceFactors.from_pretrained(factors_dir)
    config = _index_config(factors is not None)
    hfi.build_index(_task(), dataset, config, output_dir=output_dir, accelerator=Accelerator(cpu=True), factors=factors)


@pytest.mark.parametrize("compression", ["none", "eigenbasis"])
def test_two_processes_build_the_index_of_one(tmp_path, compression):
    factors = None
    if compression == "eigenbasis":  # chosen by a budget, its ranks from the main process's sample
        factors = hfi.fit_factors(_task(), mnist_dataset(EXAMPLES, 8), CONFIG)
        factors.save_pretrained(tmp_path / "factors")
    factors_dir = None if factors is None else str(tmp_path / "factors")
    debug_launcher(_index_on_every_rank, args=(str(tmp_path / "two"), factors_dir), num_processes=2)
    config = _index_config(factors is not None)
    single = hfi.build_index(_task(), mnist_dataset(EXAMPLES, 8), config, output_dir=tmp_path / "one", factors=factors)
    merged = hfi.GradientIndex.from_pretrained(tmp_path / "two")
    assert merged.metadata.config.compression == compression
    assert sorted(path.name for path in (tmp_path / "two").iterdir()) == sorted(
        path.name for path in (tmp_path / "one").iterdir()
    )
    for (ids_one, shard_one), (ids_two, shard_two) in zip(single.iter_shards(), merged.iter_shards(), strict=True):
        assert torch.equal(ids_one, ids_two)
        for module, stored in shard_one.items():
            assert shard_two[module].keys() == stored.keys()
            for key, value in stored.items():
                other, rtol = shard_two[module][key], 1e-10
                if value.dtype == torch.uint8:  # compare fp32 values: codes of a gradient that is 0 up to rounding vary
                    value, other, rtol = Quantized._decode(stored, key), Quantized._decode(shard_two[module], key), 1e-6
                torch.testing.assert_close(other, value, rtol=rtol, atol=1e-12)
    if compression == "eigenbasis":  # with a search sketch, equal up to its bf16 rounding
        torch.testing.assert_close(merged.sketch_column().float(), single.sketch_column().float(), rtol=1e-2, atol=1e-6)


def _needs_ids_on_every_rank() -> None:
    accelerator = Accelerator(cpu=True)
    with pytest.raises(KeyError, match="stable ids"):
        hfi.fit_factors(_task(), mnist_dataset(4, 8).remove_columns("id"), CONFIG, accelerator=accelerator)


def test_several_processes_need_an_id_column():
    debug_launcher(_needs_ids_on_every_rank, num_processes=2)


def test_a_launch_for_several_processes_running_as_one_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="launched for 2 processes but runs as one"):
        Ranks(None)
