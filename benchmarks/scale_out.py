"""Throughput of fitting and indexing with 1 and 2 processes (issue 4), and what the ranks exchange.

    python benchmarks/scale_out.py                 # 256 digits, 1 draw each, the 1.1 M-parameter UNet
    python benchmarks/scale_out.py --examples 32   # a quick smoke run

One process uses 2 torch threads; two processes (accelerate, CPU, gloo) use 1 thread each, so both
runs use the machine's 2 cores. Communication is counted as the bytes each rank puts into the
all-reduces and broadcasts of `hf_influence.distributed.Ranks`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator, debug_launcher
from diffusers import DDPMScheduler
from models import benchmark_unet

import hf_influence as hfi
from hf_influence.data import mnist_demo_dataset
from hf_influence.distributed import Ranks

RESULTS = Path(__file__).resolve().parent / "results" / "scale_out.json"


def count_communication() -> dict[str, int]:
    """Wrap the collectives so that each rank tallies the bytes it sends."""
    sent = {"bytes": 0}
    original_sum, original_broadcast = Ranks.sum, Ranks.broadcast

    def counted_sum(self: Ranks, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            sent["bytes"] += tensor.numel() * tensor.element_size()
        return original_sum(self, tensor)

    def counted_broadcast(self: Ranks, tensor: torch.Tensor, owner: int) -> torch.Tensor:
        if self.world > 1 and self.rank == owner:
            sent["bytes"] += tensor.numel() * tensor.element_size()
        return original_broadcast(self, tensor, owner)

    Ranks.sum, Ranks.broadcast = counted_sum, counted_broadcast
    return sent


def run(examples: int, draws: int, output: str, processes: int) -> None:
    accelerator = Accelerator(cpu=True) if processes > 1 else None
    torch.set_num_threads(2 // processes)  # after the Accelerator, which sets its own thread count
    sent = count_communication()
    task = hfi.DiffusionTask(benchmark_unet(), DDPMScheduler())
    dataset = mnist_demo_dataset(examples, 32)
    task.fingerprint()  # hashing the weights is not part of either phase
    start = time.perf_counter()
    hfi.fit_factors(task, dataset, hfi.FactorConfig(draws_per_example=draws), accelerator=accelerator)
    fit_seconds = time.perf_counter() - start
    fit_bytes = sent["bytes"]
    start = time.perf_counter()
    config = hfi.IndexConfig(draws_per_example=draws, compression="svd", rank=2, quantize_bits=8, shard_size=64)
    hfi.build_index(task, dataset, config, output_dir=f"{output}/index-{processes}", accelerator=accelerator)
    index_seconds = time.perf_counter() - start
    rank = 0 if accelerator is None else accelerator.process_index
    result = {
        "processes": processes,
        "fit_s": fit_seconds,
        # EK-FAC makes two passes over the data
        "fit_draws_per_s": 2 * examples * draws / fit_seconds,
        "index_s": index_seconds,
        "index_draws_per_s": examples * draws / index_seconds,
        "fit_sent_mb_per_rank": fit_bytes / 2**20,
        "index_sent_mb_per_rank": (sent["bytes"] - fit_bytes) / 2**20,
    }
    Path(f"{output}/result-{processes}-{rank}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--draws", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hfi_scale_out_") as output:
        run(args.examples, args.draws, output, processes=1)
        debug_launcher(run, args=(args.examples, args.draws, output, 2), num_processes=2)
        results = [json.loads(Path(f"{output}/result-{p}-0.json").read_text()) for p in (1, 2)]
    print("| processes | fit draws/s | index draws/s | sent per rank: fit / index (MB) |")
    print("|---:|---:|---:|---:|")
    for result in results:
        print(
            f"| {result['processes']} | {result['fit_draws_per_s']:.1f} | {result['index_draws_per_s']:.1f} | "
            f"{result['fit_sent_mb_per_rank']:.1f} / {result['index_sent_mb_per_rank']:.1f} |"
        )
    RESULTS.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
