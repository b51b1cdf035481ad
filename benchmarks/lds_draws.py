"""LDS against draws: how many (t, ε) draws each gradient estimator needs for EK-FAC's attribution quality,
beside TRAK, D-TRAK, DAS and pixel similarity, on the LDS benchmark's models and ground truth.

    python benchmarks/lds_mnist.py ...                  # first: the full model and queries in --workdir
    python benchmarks/lds_draws.py                      # results/lds_draws.json and results/lds_draws.png
    python benchmarks/lds_draws.py --summary-only       # the table and plot from what is cached

EK-FAC (expand, λ = 1e-8, its factors fitted once with 8 plain draws per example) scores the 32 queries
against the 1000 training digits with K draws per gradient on both sides — the queries' loss gradients and
the training gradients — for every estimator (`hf_influence/estimators.py`) and K in --draws. Every score
matrix is cached in --workdir; each LDS is against `results/lds_mnist_ground_truth` (its subsets × seeds),
with per-query paired differences against the plain estimator at the same K.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds_mnist  # the benchmark's data, model recipe and query images

RESULTS = Path(__file__).resolve().parent / "results"
GROUND_TRUTH = RESULTS / "lds_mnist_ground_truth"
ESTIMATORS = ["plain", "stratified", "antithetic", "common", "stratified+antithetic", "stratified+antithetic+common"]
DAMPING = lds_mnist.KFAC_DEFAULT


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/hf_influence_lds_mnist", help="lds_mnist.py's workdir")
    parser.add_argument("--draws", type=int, nargs="+", default=[8, 16, 32, 64], help="K for every estimator")
    parser.add_argument("--estimators", nargs="+", default=ESTIMATORS)
    parser.add_argument(
        "--long-draws", type=int, default=250, help="K for the plain estimator and the best one at 32 draws (0: none)"
    )
    parser.add_argument("--baseline-draws", type=int, default=64, help="K of TRAK, D-TRAK and DAS")
    parser.add_argument("--summary-only", action="store_true", help="compute nothing; summarise the cache")
    return parser.parse_args()


class ScoreCache:
    """One safetensors file per score matrix in workdir/draws, with the seconds it took."""

    def __init__(self, directory: Path, summary_only: bool) -> None:
        self.directory, self.summary_only = directory, summary_only
        directory.mkdir(parents=True, exist_ok=True)
        timings = directory / "timings.json"
        self.seconds: dict[str, float] = json.loads(timings.read_text()) if timings.is_file() else {}

    def cached(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every cached matrix whose key starts with `prefix`, by the rest of its key (from earlier runs too)."""
        from safetensors.torch import load_file

        files = sorted(self.directory.glob(f"{prefix}*.safetensors"))
        return {path.stem[len(prefix) :].replace("_", "+"): load_file(str(path))["scores"] for path in files}

    def get(self, key: str, compute: Any) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file, save_file

        path = self.directory / f"{key.replace('+', '_')}.safetensors"
        if path.is_file():
            return load_file(str(path))
        if self.summary_only:
            return None
        start = time.perf_counter()
        scores = {name: value.to(torch.float32).contiguous() for name, value in compute().items()}
        self.seconds[key] = time.perf_counter() - start
        save_file(scores, str(path))
        (self.directory / "timings.json").write_text(json.dumps(self.seconds, indent=2))
        print(f"[lds_draws] {key}: {self.seconds[key]:.0f} s", flush=True)
        return scores


def benchmark_inputs(workdir: Path) -> tuple[Any, torch.Tensor, Any, Any]:
    """The committed ground truth, its queries, the 1000 training digits and the full model's task (from
    lds_mnist.py's `workdir`, whose queries must be the ground truth's)."""
    from safetensors.torch import load_file

    from hf_influence.evaluation import GroundTruth
    from hf_influence.evaluation.ground_truth import load_model_task

    ground_truth = GroundTruth.from_pretrained(GROUND_TRUTH)
    samples = load_file(str(workdir / "queries.safetensors"))["queries"]
    if not torch.equal(samples, ground_truth.queries):
        raise SystemExit(f"{workdir}'s queries are not the ground truth's: run lds_mnist.py with its settings.")
    dataset = lds_mnist.digits(lds_mnist.parse_args(["--workdir", str(workdir)]))
    return ground_truth, samples, dataset, load_model_task(workdir / "full")


def ekfac_factors(task: Any, dataset: Any, workdir: Path) -> Any:
    """EK-FAC expand factors with 8 plain draws per example (shared with lds_mnist.py's cache)."""
    import hf_influence as hfi

    path = workdir / "factors-M8" / "ekfac-expand"
    if (path / "config.json").is_file():
        return hfi.InfluenceFactors.from_pretrained(path)
    factors = hfi.fit_factors(task, dataset, hfi.FactorConfig(strategy="ekfac", approx="expand", draws_per_example=8))
    factors.save_pretrained(path)
    return factors


def ekfac_scores(task: Any, dataset: Any, samples: torch.Tensor, factors: Any, draws: int, name: str) -> torch.Tensor:
    """[Q, N] EK-FAC scores with `draws` draws of estimator `name` on both sides."""
    from hf_influence.curvature.layers import find_layers
    from hf_influence.data import iter_example_batches
    from hf_influence.engine import DrawPlan
    from hf_influence.estimators import Estimator
    from hf_influence.gradients import per_example_scores, query_gradients

    estimator = Estimator.named(name)
    layers = find_layers(task.denoiser)
    grads = query_gradients(task, layers, samples, "loss", draws, seed=0, batch_size=64, estimator=estimator)
    preconditioned = {}
    for layer, (weight, bias) in grads.items():
        rotated = factors.to_eigenbasis(layer, weight, bias)
        weight, bias = factors.precondition_in_eigenbasis(layer, *rotated, DAMPING)
        preconditioned[layer] = (weight.float(), None if bias is None else bias.float())
    plan = DrawPlan.training(draws, seed=0, batch_size=64, estimator=estimator)
    columns = [
        per_example_scores(task, layers, batch.examples, batch.ids, plan, preconditioned).cpu()
        for batch in iter_example_batches(dataset, task, max(1, 64 // draws))
    ]
    return torch.cat(columns, dim=1)


def baseline_scores(task: Any, dataset: Any, samples: torch.Tensor, method: str, draws: int) -> dict[str, Any]:
    """TRAK / D-TRAK / DAS at every λ of lds_mnist's sweep (projection dimension 2048)."""
    from hf_influence.baselines import DAS, TRAK, TRAKConfig

    measurement = {"trak": "loss", "d-trak": "square_norm", "das": "mean_output"}[method]
    config = TRAKConfig(measurement=measurement, projection_dim=2048, draws_per_example=draws)
    fitted = (DAS if method == "das" else TRAK)(task, dataset, config)
    features = fitted.query_features(samples)
    return {f"{damping:g}": fitted.scores_from_features(features, damping) for damping in lds_mnist.TRAK_DAMPINGS}


def summarise(results: dict[str, Any], ground_truth: Any, args: argparse.Namespace) -> dict[str, Any]:
    from hf_influence.evaluation import exact_retraining_ceiling, lds, split_half_correlation

    def paired(scores: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        difference = lds(scores, ground_truth).per_query - lds(reference, ground_truth).per_query
        return {"mean": difference.mean().item(), "stderr": (difference.std() / len(difference) ** 0.5).item()}

    def entry(scores: torch.Tensor) -> dict[str, float]:
        result = lds(scores, ground_truth)
        return {"mean": result.mean, "stderr": result.stderr}

    curve: dict[str, dict[str, Any]] = {}
    for key, scores in results["ekfac"].items():
        name, draws = key.rsplit("@", 1)
        plain = results["ekfac"].get(f"plain@{draws}")
        row = entry(scores)
        if plain is not None and name != "plain":
            row["paired_vs_plain"] = paired(scores, plain)
        curve.setdefault(name, {})[draws] = row
    baselines = {}
    for method, sweep in results["baselines"].items():
        table = {damping: entry(scores) for damping, scores in sweep.items()}
        best = max(table, key=lambda damping: table[damping]["mean"])
        baselines[method] = {
            "default_1e-3": table.get("0.001"),
            "best": {"damping": best, **table[best]},
            "sweep": table,
        }
    if "pixel" in results:
        baselines["pixel"] = entry(results["pixel"])
    ceiling = exact_retraining_ceiling(ground_truth) if ground_truth.num_seeds > 1 else None
    halves = split_half_correlation(ground_truth) if ground_truth.num_seeds > 1 else None
    return {
        "command": "python benchmarks/lds_draws.py " + " ".join(sys.argv[1:]),
        "scores_computed_by": "earlier runs of this script, cached in --workdir/draws (their seconds below)"
        if args.summary_only
        else "this run and any cached earlier ones",
        "ground_truth": {
            "subsets": ground_truth.num_subsets,
            "seeds": list(ground_truth.protocol.seeds),
            "queries": ground_truth.num_queries,
            "exact_retraining_ceiling": None if ceiling is None else {"mean": ceiling.mean, "stderr": ceiling.stderr},
            "split_half": None if halves is None else {"mean": halves.mean, "stderr": halves.stderr},
        },
        "ekfac_damping": DAMPING,
        "lds_vs_draws": {
            name: dict(sorted(rows.items(), key=lambda item: int(item[0]))) for name, rows in curve.items()
        },
        "baselines_at_draws": args.baseline_draws,
        "baselines": baselines,
    }


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, rows in summary["lds_vs_draws"].items():
        draws = [int(k) for k in rows]
        means = [100 * rows[k]["mean"] for k in rows]
        errors = [100 * rows[k]["stderr"] for k in rows]
        axes.errorbar(draws, means, yerr=errors, marker="o", capsize=3, label=f"EK-FAC, {name}")
    for method, result in summary["baselines"].items():
        best = result.get("best", result)
        label = f"{method} (best λ)" if "best" in result else method
        axes.axhline(100 * best["mean"], linestyle="--", linewidth=1, color="grey")
        axes.text(0.01, 100 * best["mean"], label, transform=axes.get_yaxis_transform(), fontsize=7, va="bottom")
    ceiling = summary["ground_truth"]["exact_retraining_ceiling"]
    if ceiling:
        axes.axhline(100 * ceiling["mean"], color="black", linewidth=1)
        label = "exact retraining (upper reference)"
        axes.text(0.01, 100 * ceiling["mean"], label, transform=axes.get_yaxis_transform(), fontsize=7, va="bottom")
    finish_plot(
        figure,
        axes,
        "(t, ε) draws per gradient, both sides",
        "LDS % (± s.e. over 32 queries)",
        "MNIST LDS benchmark: attribution quality against draws",
        path,
    )


def finish_plot(figure: Any, axes: Any, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    """The benchmarks' LDS plots: a log₂ x axis, labels, the legend at the lower right, saved at 120 dpi."""
    axes.set_xscale("log", base=2)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)

    from hf_influence.baselines import pixel_similarity_scores

    workdir = Path(args.workdir)
    ground_truth, samples, dataset, task = benchmark_inputs(workdir)
    cache = ScoreCache(workdir / "draws", args.summary_only)
    factors = None if args.summary_only else ekfac_factors(task, dataset, workdir)

    def ekfac(name: str, draws: int) -> torch.Tensor | None:
        scores = cache.get(
            f"ekfac-{name}@{draws}", lambda: {"scores": ekfac_scores(task, dataset, samples, factors, draws, name)}
        )
        return None if scores is None else scores["scores"]

    results: dict[str, Any] = {"ekfac": {}, "baselines": {}}
    for draws in args.draws:
        for name in args.estimators:
            results["ekfac"][f"{name}@{draws}"] = ekfac(name, draws)
    for method in ("trak", "d-trak", "das"):
        results["baselines"][method] = cache.get(
            f"{method}@{args.baseline_draws}",
            lambda method=method: baseline_scores(task, dataset, samples, method, args.baseline_draws),
        )
    results["pixel"] = pixel_similarity_scores(task, samples, dataset)
    results["ekfac"] = cache.cached("ekfac-")  # this run's and any earlier run's draw counts and estimators
    results["baselines"] = {key: value for key, value in results["baselines"].items() if value is not None}
    # The long run: plain, and the estimator that is best at 32 draws.
    if "plain@32" in results["ekfac"] and args.long_draws:
        summary = summarise(results, ground_truth, args)
        at_32 = {name: rows["32"]["mean"] for name, rows in summary["lds_vs_draws"].items() if "32" in rows}
        for name in dict.fromkeys(["plain", max(at_32, key=at_32.get)]):
            scores = ekfac(name, args.long_draws)
            if scores is not None:
                results["ekfac"][f"{name}@{args.long_draws}"] = scores

    summary = summarise(results, ground_truth, args)
    summary["seconds"] = cache.seconds
    summary["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1}
    (RESULTS / "lds_draws.json").write_text(json.dumps(summary, indent=2))
    plot(summary, RESULTS / "lds_draws.png")
    for name, rows in summary["lds_vs_draws"].items():
        cells = ", ".join(f"{k}: {100 * v['mean']:.1f} ± {100 * v['stderr']:.1f}" for k, v in rows.items())
        print(f"EK-FAC {name:32s} {cells}")
    print(json.dumps(summary["baselines"] | {"ground_truth": summary["ground_truth"]}, indent=1, default=str)[:3000])


if __name__ == "__main__":
    main()
