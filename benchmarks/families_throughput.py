"""Draws per second of every pipeline family at its tiny test config, on this CPU (one thread).

Covariance pass (GGN^model probes through the capture), a per-example-gradient pass (the index's work) and the
recorded conditioning of one batch, for the tiny pipelines of tests/tiny_pipelines.py (random weights, nothing
downloaded). A class of speed, for the README's pipelines table — not a property of the full-size models.

    python benchmarks/families_throughput.py            # writes benchmarks/results/families_throughput.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_pipelines import FAMILY_KINDS, IMAGE_SIDES, IMAGE_SIZE, KINDS, digit_dataset, saved_pipeline

import hf_influence as hfi
from hf_influence.curvature.layers import find_layers
from hf_influence.engine import DrawPlan
from hf_influence.gradients import per_example_gradients

COLUMNS = {"dit": {"label_column": "label"}, "ldm_kl": {}, "ldm_vq": {}}


def measure(kind: str, workdir: Path, draws: int, repeats: int) -> dict:
    side = IMAGE_SIDES.get(kind, IMAGE_SIZE)
    pipeline = saved_pipeline(kind, workdir)
    task = hfi.DiffusionTask.from_pipeline(pipeline, resolution=side, **COLUMNS.get(kind, {"caption_column": "text"}))
    rows = digit_dataset(8, size=side)
    config = hfi.FactorConfig(strategy="kfac", draws_per_example=draws, batch_size=8 * draws)
    hfi.fit_factors(task, rows, config)  # warm-up
    fit = min(_timed(lambda: hfi.fit_factors(task, rows, config)) for _ in range(repeats))
    examples = task.examples_from_rows(list(rows))
    layers = find_layers(task.denoiser)
    plan = DrawPlan.training(draws, 0, 8 * draws)
    gradients = min(
        _timed(lambda: per_example_gradients(task, layers, examples, rows["id"], plan)) for _ in range(repeats)
    )
    encode = min(_timed(lambda: task.examples_from_rows(list(rows))) for _ in range(repeats))
    return {
        "family": task.family.name,
        "sample_shape": list(task.sample_shape),
        "parameters": sum(p.numel() for p in task.denoiser.parameters()),
        "fit_draws_per_s": 8 * draws / fit,
        "gradient_draws_per_s": 8 * draws / gradients,
        "encode_rows_per_s": 8 / encode,
    }


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=4, help="draws per example")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--out", default="benchmarks/results/families_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for kind in sorted(KINDS) + sorted(FAMILY_KINDS):
            results[kind] = measure(kind, Path(folder) / kind, args.draws, args.repeats)
            print(kind, json.dumps(results[kind]), flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
