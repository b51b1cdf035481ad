"""Index compression judged by attribution quality: the LDS of each compressor at 4, 16, 32 and 64 KB per example
beside the exact index, on the LDS benchmark's models and ground truth.

    python benchmarks/lds_mnist.py ...      # first: the full model and queries in --workdir
    python benchmarks/index_lds.py          # results/index_lds.json and results/index_lds.png

The 1000 training digits' gradients (64 draws of the default "common" estimator, as the index builds them) are
computed once and compressed by every compressor at every budget, exactly as `build_index` does (the linear part
as `transform`, then `encode`); the 32 queries (64 draws) are preconditioned by EK-FAC (expand, fitted with 8
draws per example) at each damping of the sweep and scored through each compressor's `query` / `scores`. The
LDS is against `results/lds_mnist_ground_truth`; Spearman is against the exact index at the same damping; each
compressor's paired LDS difference is against the exact index at its own best damping.
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
import lds_draws

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = [4096, 16384, 32768, 65536]
DAMPINGS = [1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
DRAWS = 64
COMPRESSORS = ["eigenbasis", "svd", "projection"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/hf_influence_lds_mnist", help="lds_mnist.py's workdir")
    parser.add_argument("--budgets", type=int, nargs="+", default=BUDGETS, help="bytes per example")
    parser.add_argument("--compressors", nargs="+", default=COMPRESSORS, choices=COMPRESSORS)
    return parser.parse_args()


def make(kind: str, budget: int, context: dict[str, Any]) -> Any | None:
    """The 8-bit compressor of `kind` whose bytes per example fit `budget` as the index build chooses it: for
    "eigenbasis", the per-layer ranks allocated on its sample of whitened gradients; for "svd" / "projection", the
    largest size that fits (None: none fits)."""
    from hf_influence.compression import Quantized, bytes_per_example, make_compressor
    from hf_influence.eigenbasis_compression import choose_ranks, whitened_bases
    from hf_influence.index import IndexConfig

    shapes, biases, layers = context["shapes"], context["biases"], context["layers"]
    if kind == "eigenbasis":
        config = IndexConfig(
            draws_per_example=DRAWS, max_bytes_per_example=budget, compression="eigenbasis", quantize_bits=8
        )
        bases = whitened_bases(context["factors"], layers)
        return Quantized(choose_ranks(context["task"], context["dataset"], layers, bases, config))
    best = None
    for size in range(1, max(max(shape) for shape in shapes.values()) + 1):
        options = {"rank": size} if kind == "svd" else {"projection_dim": size}
        compressor = make_compressor(IndexConfig(compression=kind, quantize_bits=8, **options), shapes)
        if bytes_per_example(compressor, shapes, biases) > budget:
            break
        best = compressor
    return best


def preconditioned_queries(task: Any, factors: Any, samples: torch.Tensor, layers: dict) -> dict[float, dict]:
    """The queries' loss gradients (64 common draws), preconditioned at each damping, in parameter space."""
    from hf_influence.estimators import Estimator
    from hf_influence.gradients import query_gradients

    grads = query_gradients(task, layers, samples, "loss", DRAWS, seed=0, estimator=Estimator.named("common"))
    rotated = {name: factors.to_eigenbasis(name, *grad) for name, grad in grads.items()}
    return {
        damping: {name: factors.precondition_in_eigenbasis(name, *value, damping) for name, value in rotated.items()}
        for damping in DAMPINGS
    }


def score_all(task, dataset, layers, compressors: dict[str, Any], queries: dict[float, dict]) -> dict[str, Any]:
    """One pass over the training gradients: exact scores at every damping, and each compressor's stored tensors,
    then its scores at every damping."""
    from hf_influence.compression import Compressor
    from hf_influence.data import iter_example_batches
    from hf_influence.engine import DrawPlan
    from hf_influence.estimators import Estimator
    from hf_influence.gradients import per_example_gradients

    exact = Compressor()
    plan = DrawPlan.training(DRAWS, seed=0, batch_size=64, estimator=Estimator.named("common"))
    stored: dict[str, dict[str, list]] = {label: {} for label in compressors}
    exact_columns: dict[float, list] = {damping: [] for damping in DAMPINGS}
    for batch in iter_example_batches(dataset, task, 16):
        grads = per_example_gradients(task, layers, batch.examples, batch.ids, plan)
        for damping, query in queries.items():
            forms = {name: exact.query(name, *query[name]) for name in layers}
            exact_columns[damping].append(
                sum(exact.scores(name, forms[name], exact.encode(name, *grads[name])) for name in layers)
            )
        for label, compressor in compressors.items():
            for name, (weight, bias) in grads.items():
                stored[label].setdefault(name, []).append(
                    compressor.encode(name, *compressor.transform(name, weight, bias))
                )
        print(f"[index_lds] {batch.ids[-1] + 1} / {len(dataset)} examples", flush=True)
    results = {"exact": {damping: torch.cat(columns, dim=1) for damping, columns in exact_columns.items()}}
    for label, compressor in compressors.items():
        layers_stored = {
            name: {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
            for name, parts in stored[label].items()
        }
        results[label] = {
            damping: sum(
                compressor.scores(name, compressor.query(name, *query[name]), layers_stored[name]) for name in layers
            )
            for damping, query in queries.items()
        }
    return results


def summarise(scores: dict[str, dict[float, torch.Tensor]], sizes: dict[str, int], ground_truth: Any) -> dict:
    from scipy.stats import spearmanr

    from hf_influence.evaluation import lds

    def best_damping(sweep: dict[float, torch.Tensor]) -> float:
        return max(sweep, key=lambda damping: lds(sweep[damping], ground_truth).mean)

    exact_best = best_damping(scores["exact"])
    exact_per_query = lds(scores["exact"][exact_best], ground_truth).per_query
    table = {}
    for label, sweep in scores.items():
        damping = best_damping(sweep)
        result = lds(sweep[damping], ground_truth)
        difference = result.per_query - exact_per_query
        spearman = [
            spearmanr(sweep[damping][q], scores["exact"][damping][q])[0] for q in range(ground_truth.num_queries)
        ]
        table[label] = {
            "bytes_per_example": sizes[label],
            "best_damping": damping,
            "lds": {"mean": result.mean, "stderr": result.stderr},
            "lds_at_1e-8": lds(sweep[1e-8], ground_truth).mean,
            "paired_vs_exact": {
                "mean": difference.mean().item(),
                "stderr": (difference.std() / len(difference) ** 0.5).item(),
            },
            "spearman_vs_exact": float(torch.tensor(spearman).mean()),
        }
    return table


def plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for kind in COMPRESSORS:
        rows = sorted((row["bytes_per_example"], row) for label, row in table.items() if label.startswith(kind))
        if rows:
            axes.errorbar(
                [size / 1024 for size, _ in rows],
                [100 * row["lds"]["mean"] for _, row in rows],
                yerr=[100 * row["lds"]["stderr"] for _, row in rows],
                marker="o",
                capsize=3,
                label=f"{kind} + 8-bit",
            )
    exact = table["exact"]
    axes.axhline(100 * exact["lds"]["mean"], color="black", linewidth=1)
    axes.text(
        0.01,
        100 * exact["lds"]["mean"],
        f"exact index ({exact['bytes_per_example'] / 1024:.0f} KB)",
        transform=axes.get_yaxis_transform(),
        fontsize=7,
        va="bottom",
    )
    lds_draws.finish_plot(
        figure,
        axes,
        "KB per example",
        "LDS % (± s.e. over 32 queries), best damping",
        "MNIST LDS benchmark: index compression against bytes",
        path,
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    from hf_influence.compression import Compressor, bytes_per_example
    from hf_influence.curvature.layers import find_layers, layer_kind

    workdir = Path(args.workdir)
    ground_truth, samples, dataset, task = lds_draws.benchmark_inputs(workdir)
    factors = lds_draws.ekfac_factors(task, dataset, workdir)
    layers = find_layers(task.denoiser)
    shapes = {name: tuple(layer_kind(module).weight_shape(module)) for name, module in layers.items()}
    biases = {name: module.bias is not None for name, module in layers.items()}
    compressors, sizes = {}, {"exact": bytes_per_example(Compressor(), shapes, biases)}
    context = {"task": task, "dataset": dataset, "factors": factors, "layers": layers, "shapes": shapes}
    context["biases"] = biases
    for kind in args.compressors:
        for budget in args.budgets:
            compressor = make(kind, budget, context)
            if compressor is not None:
                label = f"{kind}@{budget // 1024}KB"
                compressors[label] = compressor
                sizes[label] = bytes_per_example(compressor, shapes, biases)
    start = time.perf_counter()
    queries = preconditioned_queries(task, factors, samples, layers)
    scores = score_all(task, dataset, layers, compressors, queries)
    seconds = time.perf_counter() - start
    table = summarise(scores, sizes, ground_truth)
    summary = {
        "command": "python benchmarks/index_lds.py " + " ".join(sys.argv[1:]),
        "draws": DRAWS,
        "estimator": "common",
        "dampings": DAMPINGS,
        "table": table,
        "seconds": seconds,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": 1},
    }
    (RESULTS / "index_lds.json").write_text(json.dumps(summary, indent=2))
    plot(table, RESULTS / "index_lds.png")
    for label, row in table.items():
        print(
            f"{label:20s} {row['bytes_per_example']:>9d} B  LDS {100 * row['lds']['mean']:5.1f} ± "
            f"{100 * row['lds']['stderr']:.1f} (λ {row['best_damping']:g}; at 1e-8 {100 * row['lds_at_1e-8']:.1f})  "
            f"vs exact {100 * row['paired_vs_exact']['mean']:+.1f} ± {100 * row['paired_vs_exact']['stderr']:.1f}  "
            f"Spearman {row['spearman_vs_exact']:.2f}"
        )


if __name__ == "__main__":
    main()
