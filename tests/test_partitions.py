"""Module partitions: the layers fitted in groups, one group per pass over the data, give the factors of one
group holding every layer; an interrupted partitioned fit resumes inside its partition."""

from __future__ import annotations

import pytest
import torch
from conftest import Crash, crash_task_after, mnist_dataset, tiny_unet
from diffusers import DDPMScheduler

import hf_influence as hfi
from hf_influence.curvature.layers import find_layers, layer_kind
from hf_influence.fitting import partition_layers

CONFIG = hfi.FactorConfig(draws_per_example=2, batch_size=4, dtype="float64")


def task() -> hfi.DiffusionTask:
    return hfi.DiffusionTask(tiny_unet().double(), DDPMScheduler())


def assert_same_factors(actual: hfi.InfluenceFactors, expected: hfi.InfluenceFactors) -> None:
    assert actual.modules == expected.modules and actual.tensors.keys() == expected.tensors.keys()
    for name, value in expected.tensors.items():
        torch.testing.assert_close(actual.tensors[name], value, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_partitioned_fits_equal_the_single_pass_fit(strategy):
    dataset = mnist_dataset(10, 8)
    config = hfi.FactorConfig(draws_per_example=2, batch_size=4, dtype="float64", strategy=strategy)
    expected = hfi.fit_factors(task(), dataset, config)
    for partitions in (2, 3):
        partitioned = hfi.fit_factors(
            task(), dataset, hfi.FactorConfig(**{**vars(config), "module_partitions": partitions})
        )
        assert_same_factors(partitioned, expected)
        assert partitioned.config.module_partitions == partitions
        assert partitioned.metadata.total_draws == expected.metadata.total_draws


def test_partitions_cover_every_layer_once_balanced_by_factor_bytes():
    layers = find_layers(tiny_unet())
    sizes = {name: sum(side**2 for side in layer_kind(module).weight_shape(module)) for name, module in layers.items()}
    for count in (1, 2, 3, len(layers), len(layers) + 4):
        groups = partition_layers(layers, count)
        assert sorted(name for group in groups for name in group) == sorted(layers)
        assert len(groups) == min(count, len(layers)) and all(groups)
        order = list(layers)
        assert all(list(group) == [name for name in order if name in group] for group in groups)
        # Greedy largest-first: no group exceeds an equal share by more than the largest layer.
        loads = [sum(sizes[name] for name in group) for group in groups]
        assert max(loads) <= sum(sizes.values()) / len(groups) + max(sizes.values())


def test_an_interrupted_partitioned_fit_resumes_inside_its_partition(tmp_path):
    dataset = mnist_dataset(10, 8)
    config = hfi.FactorConfig(**{**vars(CONFIG), "module_partitions": 2})
    expected = hfi.fit_factors(task(), dataset, CONFIG)
    crashing = task()
    # 5 forward passes per pass over the data, 2 passes (covariances, correction) per partition: the 13th
    # forward pass is in the second partition's covariance pass.
    crash_task_after(crashing, 13)
    with pytest.raises(Crash):
        hfi.fit_factors(crashing, dataset, config, checkpoint_dir=tmp_path, checkpoint_every=1)
    del crashing.run
    assert {path.name for path in tmp_path.iterdir()} == {"partition-0", "partition-1"}
    resumed = hfi.fit_factors(crashing, dataset, config, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    assert_same_factors(resumed, expected)


def test_module_partitions_must_be_a_positive_whole_number():
    with pytest.raises(ValueError, match=r"FactorConfig\.module_partitions must be a whole number ≥ 1, got 0"):
        hfi.FactorConfig(module_partitions=0)
