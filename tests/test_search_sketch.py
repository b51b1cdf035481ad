"""The search sketch: its maths against an explicit Khatri–Rao matrix, and the sketch-then-rescore search against
exhaustive search on a real index."""

from __future__ import annotations

import pytest
import torch
from conftest import mnist_dataset, tiny_unet
from diffusers import DDPMScheduler
from safetensors import safe_open

import hf_influence as hfi
from hf_influence.compression import dequantized
from hf_influence.index.sketch import SearchSketch

DRAWS = 2


def test_the_sketch_is_a_khatri_rao_projection_of_dense_and_low_rank_entries():
    sketch, (d_out, width) = SearchSketch(dim=16, seed=3), (5, 7)
    left, right = torch.randn(3, d_out, 2, dtype=torch.float64), torch.randn(3, 2, width, dtype=torch.float64)
    weight, bias = left @ right, torch.randn(3, d_out)
    project_out, project_in, project_bias = sketch._gaussians("layer", d_out, width)
    rows = torch.stack([torch.kron(project_out[:, j], project_in[:, j]) for j in range(16)])  # (m, d_out · width)
    expected = (weight.float().flatten(1) @ rows.T + bias @ project_bias) / 4
    dense = sketch.layer("layer", {"weight": weight.flatten(1), "bias": bias}, (d_out, width))
    low_rank = sketch.layer("layer", {"weight.left": left, "weight.right": right, "bias": bias}, (d_out, width))
    query_form = sketch.layer("layer", {"weight.full": weight, "bias": bias}, (d_out, width))
    for actual in (dense, low_rank, query_form):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    # Other layer names and seeds draw other Gaussians; the same ones draw the same (every process, every query).
    assert not torch.equal(sketch._gaussians("other", d_out, width)[0], project_out)
    assert torch.equal(SearchSketch(dim=16, seed=3)._gaussians("layer", d_out, width)[0], project_out)


def test_sketch_inner_products_estimate_the_scores_without_bias():
    """E⟨S q, S g⟩ = ⟨q, g⟩ over layers: the mean of many independent sketches is the score, the spread ~ 1/√m."""
    shapes = {"a": (6, 9), "b": (4, 3)}
    query = {
        name: {"weight.full": torch.randn(1, *shape), "bias": torch.randn(1, shape[0])}
        for name, shape in shapes.items()
    }
    train = {
        name: {
            "weight.full": 0.5 * query[name]["weight.full"] + torch.randn(1, *shape),
            "bias": torch.randn(1, shape[0]),
        }
        for name, shape in shapes.items()
    }
    score = sum(
        (query[n]["weight.full"] * train[n]["weight.full"]).sum() + query[n]["bias"] @ train[n]["bias"].T
        for n in shapes
    )
    estimates = []
    for seed in range(400):
        sketch = SearchSketch(dim=32, seed=seed)
        estimates.append((sketch.of(query, shapes) @ sketch.of(train, shapes).T).item())
    estimates = torch.tensor(estimates)
    assert abs(estimates.mean() - score.item()) < 4 * estimates.std() / len(estimates) ** 0.5
    norms = (
        sum(entry["weight.full"].square().sum() + entry["bias"].square().sum() for entry in side.values()) ** 0.5
        for side in (query, train)
    )
    assert estimates.std() < 2 * torch.prod(torch.tensor(list(norms))) / 32**0.5


@pytest.fixture(scope="module")
def setup():
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    dataset = mnist_dataset(48, 8)
    factors = hfi.fit_factors(task, dataset, hfi.FactorConfig(draws_per_example=2))
    queries = task.preprocess([image for image in mnist_dataset(51, 8)[48:]["image"]])
    return task, dataset, factors, queries


COMPRESSORS = {  # the sketch's compressor, chosen by a budget or named
    "budget": {"max_bytes_per_example": 6000},
    "eigenbasis": {"compression": "eigenbasis", "rank": 2, "quantize_bits": 8},
}


@pytest.mark.parametrize("compressor", list(COMPRESSORS))
def test_an_index_with_a_sketch_records_its_bytes_and_its_search_rescores_the_candidates(setup, tmp_path, compressor):
    task, dataset, factors, queries = setup
    options = COMPRESSORS[compressor]
    config = hfi.IndexConfig(draws_per_example=DRAWS, shard_size=16, search_dim=512, **options)
    index = hfi.build_index(task, dataset, config, output_dir=tmp_path, factors=factors)
    # The sketch (bf16, 2 bytes a value) is inside any budget, and recorded: the stored bytes are what is recorded.
    stored = 0
    for shard in index.metadata.shards:
        with safe_open(str(index.files.path(shard.file)), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key not in ("ids", "digests"):
                    tensor = handle.get_tensor(key)
                    stored += tensor.numel() * tensor.element_size()
    assert stored / len(index) == index.metadata.bytes_per_example <= options.get("max_bytes_per_example", stored)
    # The stored sketch is the sketch of the stored entries.
    expected = torch.cat(
        [
            index.sketch.of({n: dequantized(e) for n, e in entries.items()}, index.space_shapes)
            for _, entries in index.iter_shards()
        ]
    )
    torch.testing.assert_close(
        index.sketch_column().float(), expected, rtol=1e-2, atol=1e-3 * expected.abs().max().item()
    )

    attributor = hfi.Attributor(task, factors, hfi.GradientIndex.from_pretrained(tmp_path))
    exhaustive = attributor.attribute(queries, top_k=3, candidates=24)  # 2 × 24 ≥ 48 examples: every one exact
    assert exhaustive.exact.all()
    found = attributor.attribute(queries, top_k=3, candidates=6)
    exact = found.exact
    assert 6 <= exact.sum() < len(index)
    torch.testing.assert_close(found.scores[:, exact], exhaustive.scores[:, exact])  # rescored exactly
    for query in range(len(queries)):  # proponents and opponents: the best and worst of the rescored
        rescored = exhaustive.scores[query].where(exact, -torch.inf)
        assert found.proponents[query].tolist() == rescored.topk(3).indices.tolist()
        rescored = exhaustive.scores[query].where(exact, torch.inf)
        assert found.opponents[query].tolist() == rescored.topk(3, largest=False).indices.tolist()
    # The sketch ranks well: each query's best example is among the 6 candidates of its sketch estimate.
    assert torch.equal(found.proponents[:, 0], exhaustive.proponents[:, 0])
    with pytest.raises(ValueError, match="candidates"):
        attributor.attribute(queries, top_k=5, candidates=2)


def test_a_sketch_larger_than_the_budget_is_refused():
    with pytest.raises(ValueError, match=r"search_dim=4096 takes 8192 bytes per example, the whole max_bytes_per_"):
        hfi.IndexConfig(max_bytes_per_example=8000, search_dim=4096)
    with pytest.raises(ValueError, match="search_dim"):
        hfi.IndexConfig(search_dim=0)


@pytest.mark.parametrize("options", [{"compression": "none"}, {"compression": "svd"}, {"compression": "projection"}])
def test_a_sketch_of_unwhitened_gradients_is_refused(options):
    """Between raw gradients the sketch's estimates do not rank the examples (Spearman about 0): refused."""
    with pytest.raises(ValueError, match=rf"search_dim needs compression='eigenbasis'.*not '{options['compression']}'"):
        hfi.IndexConfig(search_dim=64, **options)


def test_a_sketch_under_a_budget_without_factors_is_refused_before_any_work(setup, tmp_path):
    task, dataset, _, _ = setup
    config = hfi.IndexConfig(max_bytes_per_example=6000, search_dim=64)
    with pytest.raises(
        ValueError, match=r"search_dim under a budget needs the factors \(build_index\(\.\.\., factors="
    ):
        hfi.build_index(task, dataset, config, output_dir=tmp_path / "index")
    assert not (tmp_path / "index").exists()
