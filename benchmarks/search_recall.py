"""The search sketch's recall on real gradients: how often the sketch-then-rescore search finds the exhaustive
search's top-8 proponents and opponents, by sketch size and by the share of examples rescored.

    python benchmarks/lds_mnist.py ...      # first: the full model and queries in --workdir
    python benchmarks/search_recall.py      # results/search_recall.json

The LDS benchmark's 1000 training digits are indexed as a user would (`build_index`, 16 draws, a 16 KB budget with
the EK-FAC factors: 8-bit eigenbasis, and a search sketch of the largest size measured); the smaller sketches are
computed from the same stored entries as the build computes them. Its 32 queries (16 draws) are attributed by
`Attributor.attribute` with each number of candidates; recall@8 is the share of the exhaustive top-8 found.
At 1 M examples the default 1024 candidates per side are 0.1 % of the index; here 0.8–13 % of 1000 are measured,
so read the figures as "rescoring this share of an index of such gradients finds this much".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lds_draws

RESULTS = Path(__file__).resolve().parent / "results"
DIMS = [128, 256, 512, 1024]
CANDIDATES = [8, 16, 32, 64, 128]
TOP_K = 8
DRAWS = 16  # per training example and query (the LDS benchmark uses 64; recall needs no more)


def sketch_column(index, sketch) -> torch.Tensor:
    """Every example's sketch of size `sketch.dim`, from its stored entries, as `build_index` computes it."""
    from hf_influence.compression import dequantized

    parts = []
    for _, stored in index.iter_shards():
        entries = {name: dequantized(entry) for name, entry in stored.items()}
        parts.append(sketch.of(entries, index.space_shapes).to(torch.bfloat16))
    return torch.cat(parts)


def recall(found: torch.Tensor, reference: torch.Tensor) -> float:
    return (
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, reference, strict=True)) / reference.numel()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/hf_influence_lds_mnist", help="lds_mnist.py's workdir")
    args = parser.parse_args()
    import hf_influence as hfi
    from hf_influence.index.sketch import SearchSketch

    workdir = Path(args.workdir)
    _, samples, dataset, task = lds_draws.benchmark_inputs(workdir)
    factors = lds_draws.ekfac_factors(task, dataset, workdir)
    config = hfi.IndexConfig(draws_per_example=DRAWS, max_bytes_per_example=16384, search_dim=max(DIMS))
    output = workdir / "index-search-sketch"
    if (output / "config.json").is_file():
        index = hfi.GradientIndex.from_pretrained(output)
    else:
        index = hfi.build_index(task, dataset, config, output_dir=output, factors=factors)
    attributor = hfi.Attributor(task, factors, index)
    exhaustive = attributor.attribute(samples, top_k=TOP_K, draws_per_query=DRAWS, candidates=len(index))
    results = {"examples": len(index), "bytes_per_example": index.metadata.bytes_per_example, "recall@8": {}}
    for dim in DIMS:
        index.sketch = SearchSketch(dim, config.seed)
        index._sketch_column = sketch_column(index, index.sketch)
        for candidates in CANDIDATES:
            found = attributor.attribute(samples, top_k=TOP_K, draws_per_query=DRAWS, candidates=candidates)
            row = {
                "proponents": recall(found.proponents, exhaustive.proponents),
                "opponents": recall(found.opponents, exhaustive.opponents),
                "rescored_share": found.exact.float().mean().item(),
            }
            results["recall@8"][f"dim={dim},candidates={candidates}"] = row
            print(dim, candidates, json.dumps(row), flush=True)
    results["command"] = "python benchmarks/search_recall.py"
    (RESULTS / "search_recall.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
