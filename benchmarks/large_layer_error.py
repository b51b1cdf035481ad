"""The large-layer approximation (truncated activation eigenbasis + scaled identity) against the exact factors.

    python benchmarks/large_layer_error.py          # writes benchmarks/results/large_layer_error.json (~2 min, CPU)

1. A mid-sized layer: the activation factor of the benchmark UNet's (`models.py`, 1.1 M parameters) widest
   convolution, fitted on 256 MNIST digits. For each rank k: the relative Frobenius error of `Â` against `A`,
   the share of tr A kept by the leading k directions, and the relative error of the damped K-FAC inverse
   `(G ⊗ Â + λI)⁻¹ v` against `(G ⊗ A + λI)⁻¹ v` on the layer's per-example training gradients, at the
   library's default damping and at a damping of 1e-3 × the mean eigenvalue.
   The same errors with the leading eigenpairs found by the randomized solver (`large_layer_solver=
   "randomized"`) instead of the full eigendecomposition.
2. Scores on the tiny test UNet (`tests/conftest.py`'s shape, 8 × 8 digits): EK-FAC pairwise scores of 8
   queries against 64 training digits with every activation factor over 64 truncated to k, against the exact
   fit's scores (Pearson, Spearman, and the overlap of each query's top-5 proponents).
3. The cost of the two solvers on synthetic factors of SD-1.5's wide sizes (4608, 11 520; k = 1024, fp32
   covariance, 2 threads): seconds and the peak memory each adds, in a fresh process per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from models import benchmark_unet
from scipy.stats import pearsonr, spearmanr

import hf_influence as hfi
from hf_influence.attribution import DEFAULT_DAMPING
from hf_influence.curvature.eigen import eigendecompose, leading_eigenpairs
from hf_influence.curvature.large_layers import truncate
from hf_influence.curvature.layer_factors import LayerFactors
from hf_influence.curvature.strategies import get_strategy
from hf_influence.data import mnist_demo_dataset
from hf_influence.engine import DrawPlan
from hf_influence.gradients import per_example_gradients

RESULTS = Path(__file__).resolve().parent / "results" / "large_layer_error.json"


def mid_sized_layer() -> dict:
    task = hfi.DiffusionTask(benchmark_unet(), DDPMScheduler())
    train = mnist_demo_dataset(256, 32)
    factors = hfi.fit_factors(task, train, hfi.FactorConfig(strategy="kfac", batch_size=64))
    name = max(factors.modules, key=lambda module: factors.metadata.shapes[module][1])
    layer = factors.layer(name)
    activation, gradient = layer.activation_covariance.double(), layer.gradient_covariance.double()
    d_in = len(activation)
    layers = {name: hfi.curvature.find_layers(task.denoiser)[name]}
    samples = task.preprocess([row["image"] for row in train.select(range(32))])
    grads = per_example_gradients(task, layers, samples, list(range(32)), DrawPlan.training(4, 0, 64))
    weight, bias = (value.double() if value is not None else None for value in grads[name])
    values, vectors = eigendecompose(activation)
    g_values, g_vectors = eigendecompose(gradient)
    exact_layer = LayerFactors(
        activation_eigenvectors=vectors,
        activation_eigenvalues=values,
        gradient_eigenvectors=g_vectors,
        gradient_eigenvalues=g_values,
        bias_eigenvalues=g_values,
    )
    kfac = get_strategy("kfac")
    mean_eigenvalue = (torch.outer(g_values, values)).mean().item()
    dampings = {"default": DEFAULT_DAMPING, "1e-3 x mean eigenvalue": 1e-3 * mean_eigenvalue}
    exact = {label: kfac.precondition(exact_layer, weight, bias, damping)[0] for label, damping in dampings.items()}
    rows = []
    for rank in (16, 32, 64, 128, 256, d_in - 1):
        top, top_vectors, residual = truncate(values, vectors, rank)
        approx = top_vectors @ torch.diag(top) @ top_vectors.T
        approx += residual * (torch.eye(d_in, dtype=approx.dtype) - top_vectors @ top_vectors.T)
        truncated = replace(
            exact_layer,
            activation_eigenvectors=top_vectors,
            activation_eigenvalues=top,
            activation_residual_eigenvalue=residual,
        )
        row = {
            "rank": rank,
            "factor_relative_error": ((approx - activation).norm() / activation.norm()).item(),
            "trace_share_kept": (top.sum() / values.sum()).item(),
            "eigenvector_bytes_ratio": rank / d_in,
        }
        randomized = leading_eigenpairs(activation, rank)
        randomized_layer = replace(
            truncated,
            activation_eigenvectors=randomized.vectors,
            activation_eigenvalues=randomized.values,
            activation_residual_eigenvalue=randomized.residual,
        )
        for label, damping in dampings.items():
            for solver, approximated in (("", truncated), (", randomized solver", randomized_layer)):
                ours = kfac.precondition(approximated, weight, bias, damping)[0]
                error = ((ours - exact[label]).norm() / exact[label].norm()).item()
                row[f"inverse_relative_error ({label}{solver})"] = error
        rows.append(row)
    return {"layer": name, "shape": factors.metadata.shapes[name], "dampings": dampings, "rows": rows}


def solver_cost(size: int, rank: int, solver: str) -> dict:
    """Seconds and peak resident memory of one truncated decomposition of a size × size factor (a fresh process
    each, so the peaks do not mix); the factor has the decaying spectrum of a real activation covariance."""
    script = f"""
import json, time, torch
from hf_influence.curvature.eigen import decompose
torch.set_num_threads(2)
generator = torch.Generator().manual_seed(0)
factor = torch.zeros({size}, {size})
for _ in range(8):  # in blocks, so that the peak before the decomposition is the factor's
    features = torch.randn({size}, 256, generator=generator) * torch.logspace(0, -4, {size})[:, None]
    factor.addmm_(features, features.T, alpha=1 / 2048)
del features
def status(key):  # kB, from /proc/self/status
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current resident size
before = status("VmRSS")
start = time.perf_counter()
decompose(factor, {rank}, {solver!r})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "extra_peak_rss_bytes": 1024 * (status("VmHWM") - before)}}))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(RESULTS.parents[2]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )


def tiny_unet_scores() -> dict:
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    digits = mnist_demo_dataset(72, 8)
    train, queries = digits.select(range(64)), task.preprocess([row["image"] for row in digits.select(range(64, 72))])
    common = {"batch_size": 64, "draws_per_example": 4}
    options = {"draws_per_query": 4, "draws_per_example": 4, "batch_size": 64}
    exact_factors = hfi.fit_factors(task, train, hfi.FactorConfig(**common))
    exact = hfi.pairwise_scores(task, exact_factors, queries, train, **options)
    sizes = [shape[1] for shape in exact_factors.metadata.shapes.values()]
    rows = []
    for rank in (8, 16, 32, 64):
        factors = hfi.fit_factors(task, train, hfi.FactorConfig(**common, max_factor_size=64, large_layer_rank=rank))
        scores = hfi.pairwise_scores(task, factors, queries, train, **options)
        top = [
            len(set(scores[q].topk(5).indices.tolist()) & set(exact[q].topk(5).indices.tolist())) / 5
            for q in range(len(queries))
        ]
        rows.append(
            {
                "rank": rank,
                "truncated_layers": sum(size > 64 for size in sizes),
                "pearson": float(pearsonr(scores.flatten().numpy(), exact.flatten().numpy()).statistic),
                "spearman": float(spearmanr(scores.flatten().numpy(), exact.flatten().numpy()).statistic),
                "top5_overlap_mean": sum(top) / len(top),
            }
        )
    return {"layers": len(sizes), "activation_factor_sizes": sorted(set(sizes)), "rows": rows}


def main() -> None:
    torch.set_num_threads(2)
    start = time.perf_counter()
    result = {
        "command": " ".join(["python benchmarks/large_layer_error.py", *sys.argv[1:]]),
        "mid_sized_layer": mid_sized_layer(),
        "tiny_unet_scores": tiny_unet_scores(),
        "solver_cost": [
            {"size": size, "rank": 1024, "solver": solver, **solver_cost(size, 1024, solver)}
            for size in (4608, 11520)
            for solver in ("eigh", "randomized")
        ],
    }
    result["seconds"] = time.perf_counter() - start
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
