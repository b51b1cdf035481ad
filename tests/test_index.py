"""Gradient index: exactness against pairwise scores, compressors, resumption, refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import mnist_dataset, tiny_unet
from diffusers import DDPMScheduler
from scipy.stats import spearmanr

import hf_influence as hfi

DRAWS = 4


@pytest.fixture(scope="module")
def setup():
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    dataset = mnist_dataset(40, 8)
    factors = hfi.fit_factors(task, dataset, hfi.FactorConfig(draws_per_example=4))
    queries = task.preprocess([image for image in mnist_dataset(44, 8)[40:]["image"]])
    exact = hfi.pairwise_scores(task, factors, queries, dataset, draws_per_query=DRAWS, draws_per_example=DRAWS)
    return task, dataset, factors, queries, exact


def _bytes_per_example(index: hfi.GradientIndex) -> float:
    return sum(record.size for record in index.files.records.values()) / len(index)


def test_uncompressed_index_equals_pairwise_scores(setup, tmp_path):
    task, dataset, factors, queries, exact = setup
    index = hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=DRAWS, shard_size=16), output_dir=tmp_path)
    assert [shard.file for shard in index.metadata.shards] == [f"index-0000{k}-of-00003.safetensors" for k in range(3)]
    result = hfi.Attributor(task, factors, hfi.GradientIndex.from_pretrained(tmp_path)).attribute(queries, top_k=5)
    torch.testing.assert_close(result.scores, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    assert result.ids.tolist() == list(range(40))
    # top-k merged across shards: proponents descending, opponents ascending, equal to a global sort
    assert torch.equal(result.proponent_ids, exact.topk(5, dim=1).indices)
    assert (result.proponent_scores.diff(dim=1) <= 0).all() and (result.opponent_scores.diff(dim=1) >= 0).all()
    rows = result.rows(dataset, query=1, which="opponents")
    assert [row["id"] for row in rows] == result.opponent_ids[1].tolist()


def test_streaming_dataset_gives_the_same_index(setup, tmp_path):
    task, dataset, factors, queries, exact = setup
    streamed = dataset.to_iterable_dataset(num_shards=4)
    index = hfi.build_index(
        task, streamed, hfi.IndexConfig(draws_per_example=DRAWS, shard_size=16), output_dir=tmp_path
    )
    result = hfi.Attributor(task, factors, index).attribute(queries)
    torch.testing.assert_close(result.scores, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    index.check_dataset(streamed)
    assert [row["id"] for row in result.rows(streamed, query=0)] == result.proponent_ids[0].tolist()


def test_damping_change_reuses_the_query_gradients(setup, tmp_path, monkeypatch):
    task, dataset, factors, queries, _ = setup
    index = hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=DRAWS, shard_size=64), output_dir=tmp_path)
    attributor = hfi.Attributor(task, factors, index)
    attributor.attribute(queries)
    calls = []
    original = hfi.attribution.query_gradients
    monkeypatch.setattr(
        "hf_influence.attribution.query_gradients", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    )
    heavy = attributor.attribute(queries, damping=1e3)
    assert calls == []
    expected = hfi.pairwise_scores(
        task, factors, queries, dataset, damping=1e3, draws_per_query=DRAWS, draws_per_example=DRAWS
    )
    torch.testing.assert_close(heavy.scores, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# Compressors, with the Spearman floor each must reach on this tiny UNet (45k parameters, 8x8 digits,
# factors from 160 draws) at the default damping 1e-8. Measured: 0.999 (8-bit), 0.98 (rank-8 SVD, with
# or without 8-bit), 0.23 (projection to 16 per side). The floors leave room for the noise of 40
# examples and 4 queries (a Spearman of unrelated rankings has a standard error of about 0.08 here).
# A random projection is weak at low damping: the preconditioned query spreads over every
# eigen-direction, so the kept fraction of coordinates bounds the correlation; that it converges is
# checked by test_projection_improves_with_its_dimension.
COMPRESSORS = [
    ({"quantize_bits": 8}, 0.98),
    ({"compression": "svd", "rank": 8}, 0.9),
    ({"compression": "svd", "rank": 8, "quantize_bits": 8}, 0.9),
    ({"compression": "projection", "projection_dim": 16}, 0.1),
    ({"compression": "projection", "projection_dim": 16, "quantize_bits": 8}, 0.1),
]


@pytest.mark.parametrize(("options", "floor"), COMPRESSORS)
def test_compressed_scores_rank_like_exact_ones(setup, tmp_path, options, floor):
    task, dataset, factors, queries, exact = setup
    index = hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=DRAWS, **options), output_dir=tmp_path)
    scores = hfi.Attributor(task, factors, index).attribute(queries).scores
    correlation = sum(spearmanr(scores[q], exact[q])[0] for q in range(len(exact))) / len(exact)
    exact_bytes = 4 * sum(p.numel() for name, p in task.denoiser.named_parameters() if "norm" not in name)
    assert correlation >= floor, f"{options}: Spearman {correlation:.3f}"
    assert _bytes_per_example(index) < exact_bytes


def test_projection_improves_with_its_dimension(setup, tmp_path):
    task, dataset, factors, queries, exact = setup
    correlations = []
    for dim in (4, 64):
        config = hfi.IndexConfig(draws_per_example=DRAWS, compression="projection", projection_dim=dim)
        index = hfi.build_index(task, dataset, config, output_dir=tmp_path / str(dim))
        scores = hfi.Attributor(task, factors, index).attribute(queries).scores
        correlations.append(sum(spearmanr(scores[q], exact[q])[0] for q in range(len(exact))) / len(exact))
    assert correlations[1] > correlations[0] + 0.2, correlations


RESUMABLE_BUILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import mnist_dataset, tiny_unet
    from diffusers import DDPMScheduler
    import hf_influence as hfi
    from hf_influence.index import builder as index_module

    write = index_module._write_shard
    def slow_write(*args, **kwargs):  # leave time to be killed between shards
        record = write(*args, **kwargs)
        time.sleep(0.5)
        return record
    index_module._write_shard = slow_write
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    hfi.build_index(task, mnist_dataset(40, 8), hfi.IndexConfig(draws_per_example=4, shard_size=8), output_dir={out!r})
    """
)


def test_killed_build_resumes_to_the_identical_index(setup, tmp_path):
    task, dataset, *_ = setup
    interrupted = tmp_path / "interrupted"
    script = RESUMABLE_BUILD.format(tests=str(Path(__file__).parent), out=str(interrupted))
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (interrupted / "partial-00001.safetensors").exists():
        assert process.poll() is None and time.time() < deadline, "the build ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "config.json").exists()

    config = hfi.IndexConfig(draws_per_example=4, shard_size=8)
    resumed = hfi.build_index(task, dataset, config, output_dir=interrupted)
    uninterrupted = hfi.build_index(task, dataset, config, output_dir=tmp_path / "uninterrupted")
    assert len(resumed) == 40
    for (ids_a, shard_a), (ids_b, shard_b) in zip(resumed.iter_shards(), uninterrupted.iter_shards(), strict=True):
        assert torch.equal(ids_a, ids_b)
        for module in shard_a:
            for key in shard_a[module]:
                torch.testing.assert_close(shard_a[module][key], shard_b[module][key])


def test_resuming_with_other_settings_is_refused(setup, tmp_path):
    task, dataset, *_ = setup
    (tmp_path / "build_state.json").write_text('{"metadata": {"num_draws": 1}}')
    with pytest.raises(ValueError, match="other settings"):
        hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=DRAWS), output_dir=tmp_path)


def test_corrupt_and_truncated_shards_are_detected(setup, tmp_path):
    task, dataset, factors, queries, _ = setup
    hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=DRAWS, shard_size=16), output_dir=tmp_path)
    shard = tmp_path / "index-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte inside a tensor
    shard.write_bytes(bytes(data))
    index = hfi.GradientIndex.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"index-00001-of-00003.*checksum"):
        hfi.Attributor(task, factors, index).attribute(queries)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated"):
        hfi.GradientIndex.from_pretrained(tmp_path)


def test_index_of_another_model_or_dataset_is_refused(setup, tmp_path):
    task, dataset, factors, queries, _ = setup
    index = hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=DRAWS), output_dir=tmp_path)
    other = hfi.DiffusionTask(tiny_unet(seed=3), DDPMScheduler())
    with pytest.raises(ValueError, match="fingerprint"):
        hfi.Attributor(other, factors, index, force=False).attribute(queries)
    index.check_dataset(dataset)
    with pytest.raises(ValueError, match="ids do not match"):
        index.check_dataset(dataset.select(range(1, 40)))
    with pytest.raises(ValueError, match="different order"):
        index.check_dataset(dataset.select(list(reversed(range(40)))))
    result = hfi.Attributor(task, factors, index).attribute(queries, top_k=3)
    with pytest.raises(KeyError, match="not in the dataset"):
        result.rows(mnist_dataset(4, 8).map(lambda row: {"id": row["id"] + 1000}))
    narrow = hfi.fit_factors(task, dataset, hfi.FactorConfig(module_filter="conv_in"))
    with pytest.raises(ValueError, match="different layers"):
        hfi.Attributor(task, narrow, index)


def test_finished_index_folder_is_not_overwritten(setup, tmp_path):
    task, dataset, *_ = setup
    hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=1), output_dir=tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="finished index"):
        hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=1), output_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_save_pretrained_copies_a_loadable_index(setup, tmp_path):
    task, dataset, factors, queries, _ = setup
    index = hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=DRAWS), output_dir=tmp_path / "a")
    index.save_pretrained(tmp_path / "b")
    copy = hfi.GradientIndex.from_pretrained(tmp_path / "b")
    assert "library_name: hf_influence" in (tmp_path / "b" / "README.md").read_text()
    first = hfi.Attributor(task, factors, hfi.GradientIndex.from_pretrained(tmp_path / "a")).attribute(queries)
    torch.testing.assert_close(hfi.Attributor(task, factors, copy).attribute(queries).scores, first.scores)


def test_max_shard_bytes_bounds_every_file(setup, tmp_path):
    task, dataset, factors, queries, _ = setup
    options = dict(draws_per_example=2, compression="svd", rank=1)
    unbounded = hfi.build_index(task, dataset, hfi.IndexConfig(**options), output_dir=tmp_path / "one")
    limit = (
        unbounded.files.records[unbounded.metadata.shards[0].file].size // 2
    )  # room for the header and a few examples
    bounded = hfi.build_index(
        task, dataset, hfi.IndexConfig(**options, max_shard_bytes=limit), output_dir=tmp_path / "bounded"
    )
    assert len(bounded.metadata.shards) > 2
    assert all(record.size <= limit for record in bounded.files.records.values())
    assert bounded.ids().tolist() == unbounded.ids().tolist()
    attribute = lambda index: hfi.Attributor(task, factors, index).attribute(queries, draws_per_query=2).scores  # noqa: E731
    torch.testing.assert_close(attribute(bounded), attribute(unbounded), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_shard_bytes"):
        hfi.build_index(task, dataset, hfi.IndexConfig(**options, max_shard_bytes=100), output_dir=tmp_path / "tiny")


def _stored_bytes_per_example(index: hfi.GradientIndex) -> float:
    """The bytes of the gradient tensors in the index's shards (ids, digests and file headers apart), per example."""
    from safetensors import safe_open

    total = 0
    for shard in index.metadata.shards:
        with safe_open(str(index.files.path(shard.file)), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if any(key.startswith(f"{name}.") for name in index.metadata.modules):
                    tensor = handle.get_tensor(key)
                    total += tensor.numel() * tensor.element_size()
    return total / len(index)


def test_a_byte_budget_chooses_the_compression_and_is_met(setup, tmp_path):
    from hf_influence.compression import Quantized, SVDCompressor, bytes_per_example

    task, dataset, factors, queries, exact = setup
    budget = 12_000
    index = hfi.build_index(
        task, dataset, hfi.IndexConfig(draws_per_example=DRAWS, max_bytes_per_example=budget), output_dir=tmp_path / "b"
    )
    chosen = index.metadata.config
    assert (chosen.compression, chosen.quantize_bits, chosen.max_bytes_per_example) == ("svd", 8, budget)
    shapes = {name: tuple(shape) for name, shape in index.metadata.shapes.items()}
    biases = {name: task.denoiser.get_submodule(name).bias is not None for name in shapes}
    stored = _stored_bytes_per_example(index)
    assert stored == bytes_per_example(Quantized(SVDCompressor(chosen.rank)), shapes, biases) <= budget
    assert bytes_per_example(Quantized(SVDCompressor(chosen.rank + 1)), shapes, biases) > budget  # the largest rank
    scores = hfi.Attributor(task, factors, index).attribute(queries, draws_per_query=DRAWS).scores
    assert spearmanr(scores.flatten(), exact.flatten()).statistic > 0.5
    # A budget the exact gradients fit in keeps them exact; one below 8-bit rank 1 is refused with the minimum.
    roomy = hfi.IndexConfig(draws_per_example=DRAWS, max_bytes_per_example=10**9)
    exact_index = hfi.build_index(task, dataset, roomy, output_dir=tmp_path / "exact")
    assert exact_index.metadata.config.compression == "none"
    torch.testing.assert_close(
        hfi.Attributor(task, factors, exact_index).attribute(queries).scores,
        exact,
        rtol=1e-4,
        atol=1e-4 * exact.abs().max().item(),
    )
    with pytest.raises(ValueError, match=r"max_bytes_per_example=10 is below the smallest index .* bytes per example"):
        hfi.build_index(task, dataset, hfi.IndexConfig(max_bytes_per_example=10), output_dir=tmp_path / "tiny")
    with pytest.raises(ValueError, match="max_bytes_per_example chooses the compression"):
        hfi.IndexConfig(max_bytes_per_example=4000, compression="projection")


def test_eigenbasis_index_at_full_rank_equals_the_exact_index(setup, tmp_path):
    """The whitened eigenbasis compressor loses nothing at full rank, on EK-FAC and on K-FAC factors with a
    truncated large layer (its activation complement included)."""
    task, dataset, factors, queries, exact = setup
    truncated = hfi.fit_factors(
        task, dataset, hfi.FactorConfig(strategy="kfac", draws_per_example=4, max_factor_size=64, large_layer_rank=20)
    )
    assert any(truncated.layer(name).truncated for name in truncated.modules)
    for fitted, reference in ((factors, exact), (truncated, None)):
        if reference is None:
            reference = hfi.pairwise_scores(
                task, fitted, queries, dataset, draws_per_query=DRAWS, draws_per_example=DRAWS
            )
        config = hfi.IndexConfig(draws_per_example=DRAWS, compression="eigenbasis", rank=10**4, shard_size=16)
        index = hfi.build_index(task, dataset, config, output_dir=tmp_path / fitted.strategy, factors=fitted)
        scores = hfi.Attributor(task, fitted, index).attribute(queries).scores
        torch.testing.assert_close(scores, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_a_byte_budget_with_factors_chooses_the_eigenbasis_and_is_met_as_recorded(setup, tmp_path):
    task, dataset, factors, queries, exact = setup
    budget = 12_000
    config = hfi.IndexConfig(draws_per_example=DRAWS, max_bytes_per_example=budget)
    index = hfi.build_index(task, dataset, config, output_dir=tmp_path / "a", factors=factors)
    chosen = index.metadata.config
    assert (chosen.compression, chosen.quantize_bits, chosen.max_bytes_per_example) == ("eigenbasis", 8, budget)
    assert _stored_bytes_per_example(index) == index.metadata.bytes_per_example <= budget
    assert index.metadata.bytes_per_example > 0.8 * budget  # the greedy allocation spends the budget
    scores = hfi.Attributor(task, factors, index).attribute(queries, draws_per_query=DRAWS).scores
    assert spearmanr(scores.flatten(), exact.flatten()).statistic > 0.95
    # The index scores without the factors' files: its basis travels with it (copied, checksummed).
    index.save_pretrained(tmp_path / "copy")
    copy = hfi.GradientIndex.from_pretrained(tmp_path / "copy")
    torch.testing.assert_close(hfi.Attributor(task, factors, copy).attribute(queries).scores, scores)
    basis = tmp_path / "copy" / "compression.safetensors"
    data = bytearray(basis.read_bytes())
    data[-5] ^= 0xFF
    basis.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"compression.safetensors.*checksum"):
        hfi.GradientIndex.from_pretrained(tmp_path / "copy")
    # It needs factors with an eigenbasis.
    with pytest.raises(ValueError, match=r"needs the fitted factors: build_index\(\.\.\., factors=factors\)"):
        hfi.build_index(task, dataset, hfi.IndexConfig(compression="eigenbasis"), output_dir=tmp_path / "none")
    identity = hfi.fit_factors(task, dataset, hfi.FactorConfig(strategy="identity", draws_per_example=1))
    with pytest.raises(ValueError, match="needs factors with an eigenbasis; these are 'identity' factors"):
        hfi.build_index(task, dataset, config, output_dir=tmp_path / "identity", factors=identity)


def test_an_interrupted_eigenbasis_build_resumes_to_the_plain_build(setup, tmp_path):
    from conftest import Crash, crash_task_after

    task, dataset, factors, *_ = setup
    config = hfi.IndexConfig(draws_per_example=DRAWS, max_bytes_per_example=12_000, shard_size=8, batch_size=4)
    plain = hfi.build_index(task, dataset, config, output_dir=tmp_path / "plain", factors=factors)
    crashing = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    crash_task_after(crashing, 40)  # the rank sample (32 examples), then two shards
    with pytest.raises(Crash):
        hfi.build_index(crashing, dataset, config, output_dir=tmp_path / "resumed", factors=factors)
    assert (tmp_path / "resumed" / "partial-00000.safetensors").is_file()
    del crashing.run
    refitted = hfi.fit_factors(task, dataset, hfi.FactorConfig(draws_per_example=1))  # not its basis's factors
    with pytest.raises(ValueError, match=r"other settings \(factors differ\)"):
        hfi.build_index(crashing, dataset, config, output_dir=tmp_path / "resumed", factors=refitted)
    resumed = hfi.build_index(crashing, dataset, config, output_dir=tmp_path / "resumed", factors=factors)
    assert resumed.metadata == plain.metadata
    for (ids_a, shard_a), (ids_b, shard_b) in zip(resumed.iter_shards(), plain.iter_shards(), strict=True):
        assert torch.equal(ids_a, ids_b)
        for module in shard_a:
            assert shard_a[module].keys() == shard_b[module].keys()
            for key in shard_a[module]:
                torch.testing.assert_close(shard_a[module][key], shard_b[module][key])


def test_rows_are_fetched_by_id_whether_or_not_ids_are_row_positions():
    from hf_influence.attribution import rows_by_id

    dataset = mnist_dataset(12, 8)
    assert [row["id"] for row in rows_by_id(dataset, [7, 0, 11])] == [7, 0, 11]  # ids are row positions
    shifted = dataset.map(lambda row: {"id": row["id"] + 5})  # id 5 is at position 0, position 5 holds id 10
    rows = rows_by_id(shifted, [5, 16, 10])
    assert [row["id"] for row in rows] == [5, 16, 10]
    assert rows[0]["image"].tobytes() == dataset[0]["image"].tobytes()
    positional = dataset.remove_columns("id")  # no id column: ids are row positions
    assert rows_by_id(positional, [3])[0]["image"].tobytes() == dataset[3]["image"].tobytes()
    with pytest.raises(KeyError, match=r"Ids \[40\] are not in the dataset"):
        rows_by_id(shifted, [40])
