"""What the architecture promises beyond the maths: caches that cannot collide, a fingerprint that follows the
weights, strategies as registered objects, renamed arguments that keep working, and no process-wide state."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import mnist_dataset, tiny_unet
from diffusers import DDPMScheduler
from peft import LoraConfig, inject_adapter_in_model

import hf_influence as hfi
from hf_influence.curvature import STRATEGIES, get_strategy
from hf_influence.files import atomic_write_text

DRAWS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    dataset = mnist_dataset(12, 8)
    factors = hfi.fit_factors(task, dataset, hfi.FactorConfig(draws_per_example=2, batch_size=16))
    config = hfi.IndexConfig(draws_per_example=DRAWS)
    index = hfi.build_index(task, dataset, config, output_dir=tmp_path_factory.mktemp("index"))
    queries = task.preprocess([row["image"] for row in mnist_dataset(14, 8).select(range(12, 14))])
    return task, dataset, factors, index, queries


def test_weighted_losses_with_other_weights_do_not_share_the_query_cache(setup):
    task, _, factors, index, queries = setup
    attributor = hfi.Attributor(task, factors, index)
    late = torch.linspace(0, 1, task.num_train_timesteps)
    early = late.flip(0)
    first = attributor.attribute(queries, measurement=hfi.WeightedLoss(late), draws_per_query=DRAWS).scores
    second = attributor.attribute(queries, measurement=hfi.WeightedLoss(early), draws_per_query=DRAWS).scores
    fresh = hfi.Attributor(task, factors, index).attribute(
        queries, measurement=hfi.WeightedLoss(early), draws_per_query=DRAWS
    )
    torch.testing.assert_close(second, fresh.scores, rtol=0, atol=0)
    assert (first - second).norm() > 0.1 * second.norm()
    assert hfi.WeightedLoss(late).cache_key() == hfi.WeightedLoss(late.clone()).cache_key()


def test_a_measurement_without_a_key_is_computed_every_time(setup):
    task, _, factors, index, queries = setup
    calls = []

    class Counted(hfi.Loss):  # a subclass inherits no key: it may compute something else
        def __call__(self, task, output):
            calls.append(1)
            return super().__call__(task, output)

    assert Counted().cache_key() is None and hfi.Loss().cache_key() is not None
    attributor = hfi.Attributor(task, factors, index)
    attributor.attribute(queries, measurement=Counted(), draws_per_query=DRAWS)
    count = len(calls)
    attributor.attribute(queries, measurement=Counted(), draws_per_query=DRAWS)
    assert count > 0 and len(calls) == 2 * count


def test_the_fingerprint_follows_the_weights_and_a_lora_loaded_after_fitting_is_refused(setup):
    _, dataset, _, _, _ = setup
    unet = tiny_unet()
    task = hfi.DiffusionTask(unet, DDPMScheduler())
    factors = hfi.fit_factors(task, dataset.select(range(4)), hfi.FactorConfig(batch_size=16))
    factors.check_compatible(task)
    before = task.fingerprint()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_k"], init_lora_weights=False), unet)
    assert task.fingerprint() != before
    with pytest.raises(
        ValueError, match=r"'down_blocks\.1\.attentions\.0\.to_q' is a peft\.tuners\.lora\.layer\.Linear now"
    ):
        factors.check_compatible(task)  # peft wrapped the layer: these factors are of the model without it

    lora = hfi.fit_factors(task, dataset.select(range(4)), hfi.FactorConfig(batch_size=16, module_filter=hfi.LORA_ONLY))
    lora.check_compatible(task)
    adapter = next(p for name, p in unet.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        adapter.add_(0.01)  # an in-place step (an optimiser's)
    with pytest.raises(ValueError, match="fingerprint"):
        lora.check_compatible(task)
    stepped = task.fingerprint()
    adapter.data.mul_(2.0)  # through .data, which autograd's version counter does not see
    assert task.fingerprint() != stepped


def test_strategies_are_registered_objects_that_precondition(setup):
    task, dataset, factors, _, queries = setup
    assert sorted(STRATEGIES) == ["ekfac", "identity", "kfac"]
    assert factors.curvature is get_strategy("ekfac")
    with pytest.raises(ValueError, match="Unknown curvature strategy 'sgd'"):
        get_strategy("sgd")
    identity = hfi.fit_factors(task, dataset, hfi.FactorConfig(strategy="identity"))
    assert identity.tensors == {} and identity.modules == factors.modules
    dot = hfi.pairwise_scores(task, identity, queries, dataset, draws_per_query=DRAWS, draws_per_example=DRAWS)
    baseline = hfi.baselines.gradient_dot_scores(task, queries, dataset, draws_per_query=DRAWS, draws_per_example=DRAWS)
    torch.testing.assert_close(dot, baseline, rtol=0, atol=0)
    # With a huge damping, EK-FAC influence times λ tends to the gradient dot product.
    damped = hfi.pairwise_scores(
        task, factors, queries, dataset, damping=1e6, draws_per_query=DRAWS, draws_per_example=DRAWS
    )
    torch.testing.assert_close(damped * 1e6, dot, rtol=1e-3, atol=1e-3 * dot.abs().max().item())


def test_renamed_arguments_keep_working_with_a_warning(setup):
    task, dataset, factors, index, queries = setup
    with pytest.warns(FutureWarning, match=r"IndexConfig\(num_draws=\.\.\.\) is deprecated: use draws_per_example"):
        assert hfi.IndexConfig(num_draws=7) == hfi.IndexConfig(draws_per_example=7)
    with pytest.warns(FutureWarning, match="num_train_draws is deprecated: use draws_per_example"):
        old = hfi.pairwise_scores(task, factors, queries, dataset, num_query_draws=DRAWS, num_train_draws=DRAWS)
    new = hfi.pairwise_scores(task, factors, queries, dataset, draws_per_query=DRAWS, draws_per_example=DRAWS)
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    with pytest.warns(FutureWarning, match="num_draws is deprecated: use draws_per_query"):
        hfi.Attributor(task, factors, index).attribute(queries, num_draws=DRAWS)
    with pytest.raises(TypeError, match="not also its old name"):
        hfi.IndexConfig(num_draws=7, draws_per_example=7)


def test_writing_files_leaves_the_process_umask_alone(tmp_path, monkeypatch):
    def forbidden(mask: int) -> int:
        raise AssertionError("os.umask was called")

    monkeypatch.setattr(os, "umask", forbidden)
    atomic_write_text(tmp_path / "a.txt", "written")
    assert (tmp_path / "a.txt").read_text() == "written"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import importlib

        import hf_influence.files

        importlib.reload(hf_influence.files)  # importing it does not touch the umask either
