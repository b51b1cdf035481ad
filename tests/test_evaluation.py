"""The LDS evaluation against known answers: a linear model whose leave-subset-out effects are exact,
Spearman against scipy, common random numbers against a direct computation, and the saved ground truth."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_unet
from diffusers import DDPMScheduler
from scipy import stats

import hf_influence as hfi
from hf_influence.evaluation import (
    GroundTruth,
    GroundTruthProtocol,
    exact_retraining_ceiling,
    lds,
    measure,
    predicted_changes,
    random_subsets,
    spearman,
    split_half_correlation,
)
from hf_influence.evaluation.top_k_removal import removed_examples


class LinearToy:
    """Linear regression with a known input covariance `A`: example j's loss is `½ wᵀAw − y_j x_jᵀw`,
    so training on a subset S gives `w*(S) = A⁻¹ mean_{j∈S} x_j y_j`, linear in the subset, and the
    measurement `m_q(w) = z_qᵀ w` of a query changes exactly additively with the removed examples."""

    def __init__(self, num_examples: int = 60, dim: int = 6, num_queries: int = 40, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_examples, dim, generator=generator, dtype=torch.float64)
        self.y = self.x @ torch.randn(dim, generator=generator, dtype=torch.float64) + torch.randn(
            num_examples, generator=generator, dtype=torch.float64
        )
        root = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        self.covariance = root @ root.T / dim + torch.eye(dim, dtype=torch.float64)
        self.queries = torch.randn(num_queries, dim, generator=generator, dtype=torch.float64)

    def train(self, kept: torch.Tensor) -> torch.Tensor:
        targets = (self.x[kept] * self.y[kept, None]).mean(dim=0)
        return torch.linalg.solve(self.covariance, targets)

    def measure(self, weights: torch.Tensor) -> torch.Tensor:
        return self.queries @ weights

    def influence(self) -> torch.Tensor:
        """`τ(q, j) = ∇m_qᵀ H⁻¹ ∇L_j(w*)` at the full-data optimum, H = A (no 1/N)."""
        optimum = self.train(torch.ones(len(self.x), dtype=torch.bool))
        gradients = optimum @ self.covariance - self.x * self.y[:, None]  # (N, d): A w* − x_j y_j
        return self.queries @ torch.linalg.solve(self.covariance, gradients.T)

    def ground_truth(self, subsets: torch.Tensor, seeds: int = 1, noise: float = 0.0) -> GroundTruth:
        generator = torch.Generator().manual_seed(1)
        exact = torch.stack([self.measure(self.train(mask)) for mask in subsets])  # (S, Q)
        measurements = exact[:, None, :] + noise * torch.randn(
            len(subsets), seeds, len(self.queries), generator=generator, dtype=torch.float64
        )
        return GroundTruth(subsets, measurements, None, GroundTruthProtocol(alpha=0.5))


def test_exact_influence_predicts_the_exact_leave_subset_out_change():
    toy = LinearToy()
    subsets = random_subsets(len(toy.x), alpha=0.5, count=50, seed=0)
    full = toy.measure(toy.train(torch.ones(len(toy.x), dtype=torch.bool)))
    actual = torch.stack([toy.measure(toy.train(mask)) for mask in subsets]).T - full[:, None]  # (Q, S)
    # Removing half the data, one per-example ε = 1/N at a time, predicts half the change (the remaining
    # examples are re-weighted by 2): the sum over removed examples, / N, has the sign and ranks of the change.
    predicted = predicted_changes(toy.influence(), subsets) / len(toy.x)
    torch.testing.assert_close(2 * predicted, actual, rtol=1e-10, atol=1e-10)


def test_lds_is_one_for_exact_influence_and_near_zero_for_random_scores():
    toy = LinearToy()
    ground_truth = toy.ground_truth(random_subsets(len(toy.x), count=50, seed=0))
    exact = lds(toy.influence(), ground_truth)
    assert exact.mean == pytest.approx(1.0, abs=1e-12)
    assert exact.per_query.shape == (40,)
    random_scores = torch.randn(40, len(toy.x), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    noise = lds(random_scores, ground_truth)
    assert abs(noise.mean) < 0.1 and abs(noise.mean) < 4 * noise.stderr


def test_sign_conventions():
    toy = LinearToy()
    ground_truth = toy.ground_truth(random_subsets(len(toy.x), count=30, seed=1))
    scores = toy.influence()
    # Summing over the kept examples instead of the removed ones flips the sign (equal subset sizes).
    kept_sums = scores @ ground_truth.subsets.to(torch.float64).T
    kept_lds = spearman(kept_sums, ground_truth.mean_measurements().T)
    torch.testing.assert_close(kept_lds, -torch.ones(40, dtype=torch.float64))
    assert lds(-scores, ground_truth).mean == pytest.approx(-1.0, abs=1e-12)
    # Positive score = removing the example increases the measurement: for one query, removing its two
    # largest-scored examples raises m_q, removing its two smallest lowers it.
    everything = torch.ones(len(toy.x), dtype=torch.bool)
    base = toy.measure(toy.train(everything))[0]
    for order, direction in ((torch.argsort(scores[0], descending=True), 1), (torch.argsort(scores[0]), -1)):
        kept = everything.clone()
        kept[order[:2]] = False
        # In this model removing a set R changes m_q by exactly Σ_{j∈R} τ(q, j) / (N − |R|).
        change = toy.measure(toy.train(kept))[0] - base
        assert direction * change > 0
    assert removed_examples(scores, 0, 3, len(toy.x)) == sorted(torch.argsort(scores[0], descending=True)[:3].tolist())


def test_exact_retraining_ceiling_is_the_lds_of_the_noise_free_expectation():
    toy = LinearToy()
    subsets = random_subsets(len(toy.x), count=200, seed=2)
    noiseless = toy.ground_truth(subsets, seeds=3, noise=0.0)
    assert exact_retraining_ceiling(noiseless).mean == pytest.approx(1.0, abs=1e-12)
    spread = float(toy.ground_truth(subsets, seeds=1).measurements.std())
    ceilings = []
    for seeds in (2, 4, 6):
        noisy = toy.ground_truth(subsets, seeds=seeds, noise=spread)
        ceiling = exact_retraining_ceiling(noisy)
        # Exact influence is the expectation here: it scores what the ceiling predicts, the split halves less.
        assert ceiling.mean == pytest.approx(lds(toy.influence(), noisy).mean, abs=0.03)
        assert split_half_correlation(noisy).mean < ceiling.mean < 0.95
        ceilings.append(ceiling.mean)
    assert ceilings == sorted(ceilings)  # more seeds, less noise in the seed mean
    with pytest.raises(ValueError, match="at least 2 training seeds"):
        exact_retraining_ceiling(toy.ground_truth(subsets, seeds=1))


def test_spearman_matches_scipy_with_ties():
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 30), generator=generator).to(torch.float64)
    b = torch.randint(0, 7, (6, 30), generator=generator).to(torch.float64) + a
    ours = spearman(a, b)
    for row in range(6):
        assert ours[row].item() == pytest.approx(stats.spearmanr(a[row], b[row]).statistic, abs=1e-12)
    assert torch.isnan(spearman(torch.ones(1, 5), torch.arange(5.0)[None])).all()


def test_random_subsets():
    subsets = random_subsets(11, alpha=0.5, count=7, seed=4)
    assert subsets.shape == (7, 11) and subsets.dtype == torch.bool
    assert (subsets.sum(dim=1) == 6).all()  # round(5.5) = 6
    assert torch.equal(subsets, random_subsets(11, alpha=0.5, count=7, seed=4))
    assert torch.equal(subsets[:3], random_subsets(11, alpha=0.5, count=3, seed=4))  # extendable
    assert not torch.equal(subsets, random_subsets(11, alpha=0.5, count=7, seed=5))
    assert len({tuple(row.tolist()) for row in subsets}) > 1
    for bad in ({"alpha": 1.0}, {"alpha": 0.0}, {"count": 0}):
        with pytest.raises(ValueError):
            random_subsets(11, **({"alpha": 0.5, "count": 3} | bad))


def direct_measurement(task: hfi.DiffusionTask, sample: torch.Tensor, query_id: int, draws: int, seed: int) -> float:
    """The loss averaged over the query's draws, computed directly from the scheduler's formulas."""
    drawn = task.draw([query_id], draws, seed, "ground-truth")
    alpha_bar = task.alphas_cumprod[drawn.timesteps].to(torch.float32).view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * sample + (1 - alpha_bar).sqrt() * drawn.noise
    with torch.no_grad():
        prediction = task.denoiser.eval()(noisy, drawn.timesteps).sample
    return (prediction - drawn.noise).pow(2).mean().item()


def test_common_random_numbers():
    task = hfi.DiffusionTask(tiny_unet(seed=0), DDPMScheduler())
    twin = hfi.DiffusionTask(copy.deepcopy(tiny_unet(seed=0)), DDPMScheduler())
    other = hfi.DiffusionTask(tiny_unet(seed=1), DDPMScheduler())
    queries = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    values = measure(task, queries, draws_per_query=12, seed=5, batch_size=8)
    # Identical models give identical measurements, whatever ran before and whatever the call order.
    measure(other, queries, draws_per_query=12, seed=5, batch_size=8)
    assert torch.equal(measure(twin, queries, draws_per_query=12, seed=5, batch_size=8), values)
    reordered = measure(task, queries.flip(0), draws_per_query=12, seed=5, batch_size=5, query_ids=[2, 1, 0])
    torch.testing.assert_close(reordered.flip(0), values, rtol=1e-6, atol=0)
    for query in range(3):
        expected = direct_measurement(task, queries[query : query + 1], query, 12, 5)
        assert values[query].item() == pytest.approx(expected, rel=1e-5)
    assert not torch.allclose(measure(other, queries, draws_per_query=12, seed=5), values)
    assert not torch.allclose(measure(task, queries, draws_per_query=12, seed=6), values)
    with pytest.raises(ValueError, match="unique"):
        measure(task, queries, draws_per_query=4, query_ids=[0, 0, 1])


def test_ground_truth_files_and_hub(tmp_path, hub):
    toy = LinearToy(num_queries=4)
    ground_truth = toy.ground_truth(random_subsets(len(toy.x), count=6, seed=0), seeds=2, noise=0.1)
    ground_truth.queries = torch.rand(4, 1, 8, 8)
    ground_truth.save_pretrained(tmp_path / "gt")
    loaded = GroundTruth.from_pretrained(tmp_path / "gt")
    assert torch.equal(loaded.subsets, ground_truth.subsets)
    assert torch.equal(loaded.measurements, ground_truth.measurements)
    assert torch.equal(loaded.queries, ground_truth.queries)
    assert loaded.protocol.alpha == 0.5
    assert lds(toy.influence(), loaded).mean == pytest.approx(lds(toy.influence(), ground_truth).mean)

    ground_truth.push_to_hub("hub-tester/lds-ground-truth", token=hub.token)
    assert "ground_truth.safetensors" in hub.api.list_repo_files("hub-tester/lds-ground-truth", repo_type="dataset")
    pulled = GroundTruth.from_pretrained("hub-tester/lds-ground-truth", token=hub.token)
    assert torch.equal(pulled.measurements, ground_truth.measurements)

    with pytest.raises(ValueError, match="queries"):
        lds(torch.zeros(3, len(toy.x)), loaded)
    with pytest.raises(ValueError, match="training set's order"):
        lds(torch.zeros(4, 5), loaded)
    (tmp_path / "gt" / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"not 'hf_influence\.ground_truth'"):
        GroundTruth.from_pretrained(tmp_path / "gt")


def test_with_seeds_adds_retraining_seeds_to_a_ground_truth():
    toy = LinearToy()
    subsets = random_subsets(len(toy.x), count=10, seed=0)
    noisy = toy.ground_truth(subsets, seeds=2, noise=0.1)
    first = GroundTruth(subsets, noisy.measurements, None, GroundTruthProtocol(alpha=0.5, seeds=(0, 1)))
    second = GroundTruth(subsets, first.measurements + 1, None, GroundTruthProtocol(alpha=0.5, seeds=(2, 3)))
    merged = first.with_seeds(second)
    assert merged.protocol.seeds == (0, 1, 2, 3) and merged.num_seeds == 4
    torch.testing.assert_close(merged.measurements[:, 2:], first.measurements + 1)
    torch.testing.assert_close(merged.measurements[:, :2], first.measurements)
    with pytest.raises(ValueError, match=r"Both ground truths were retrained with seeds \[0, 1\]"):
        first.with_seeds(first)
    other_subsets = random_subsets(len(toy.x), count=10, seed=1)
    with pytest.raises(ValueError, match="different subsets"):
        first.with_seeds(GroundTruth(other_subsets, second.measurements, None, second.protocol))
    with pytest.raises(ValueError, match="different protocols"):
        first.with_seeds(
            GroundTruth(
                subsets, second.measurements, None, GroundTruthProtocol(alpha=0.5, seeds=(2,), draws_per_query=8)
            )
        )
