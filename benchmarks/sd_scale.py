"""K-FAC covariance fitting at Stable Diffusion 1.5 scale: hf_influence vs kronfluence 1.0.1, fp32 and bf16 autocast.

    python benchmarks/sd_scale.py                      # GPU: the SD-1.5 UNet config, random weights, 64×64 latents
    python benchmarks/sd_scale.py --scaled-down        # CPU: a small UNet2DConditionModel, the same code path

The denoiser is a `UNet2DConditionModel` built from the SD-1.5 UNet config shipped with the package
(`hf_influence/plan_configs/sd15_unet.json`, 860 M parameters) with random weights (`torch.manual_seed(0)`),
conditioned on one fixed random prompt embedding (77 × 768), on random 4 × 64 × 64 latents: nothing is
downloaded. Each library fits the covariance factors `A` and `G` of every Linear and Conv2d layer (GGN^model,
one Monte-Carlo probe per draw, K-FAC expand) on the same `--draws` (t, ε, ξ) draws, `--batch-size` draws per
forward/backward pass, after one untimed warm-up batch:

* hf_influence: the covariance pass of `fit_factors` (`CovarianceAccumulator` over the task's draws);
* kronfluence: `fit_covariance_matrices_with_loader` (what `Analyzer.fit_covariance_matrices` runs before it
  saves to disk) on rows precomputed from hf_influence's own draws, its pseudo-target
  `pred.detach() + sqrt(D/2) ξ` giving the same output-gradient distribution. Its final copy of the factors to
  the CPU is timed apart (`gather_to_cpu_s`) and not counted in its draws per second.

"bf16" runs the forward and backward passes under `torch.autocast(bfloat16)` with fp32 weights; both libraries
keep the covariances in fp32 (hf_influence computes its covariance products outside autocast; kronfluence's
`amp_dtype=torch.bfloat16` with fp32 covariance dtypes). Each (library, precision) runs in its own process so
that peak memory is its own: `torch.cuda.max_memory_allocated` on a GPU, the peak RSS on the CPU. The ratio
is hf_influence's draws per second over kronfluence's. Results go to benchmarks/results/sd_scale_{gpu,cpu}.json.

What the eigendecompositions cost is not part of the draws per second: `--eigh-sizes 11520 23040` times one
fp64 `torch.linalg.eigh` of a random covariance of each size (SD-1.5's largest activation factors).
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
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
PROMPT_TOKENS = 77
SCALED_DOWN = {
    "_class_name": "UNet2DConditionModel",
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "in_channels": 4,
    "out_channels": 4,
    "sample_size": 16,
}


# ---------------------------------------------------------------------------------------------- shared set-up


def unet_config(scaled_down: bool) -> dict[str, Any]:
    from hf_influence.planning import preset_config

    return dict(SCALED_DOWN) if scaled_down else preset_config("sd15")


def build_denoiser(config: dict[str, Any], device: Any) -> Any:
    """The UNet with seeded random weights (initialised on `device` directly), dressed as an unconditional
    denoiser `(sample, t) -> .sample` by one fixed prompt embedding."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch import nn

    class FixedPrompt(nn.Module):
        def __init__(self, unet: nn.Module, prompt: torch.Tensor) -> None:
            super().__init__()
            self.unet = unet
            self.register_buffer("prompt", prompt)
            self.config = SimpleNamespace(sample_size=unet.config.sample_size, in_channels=unet.config.in_channels)

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> Any:
            return self.unet(sample, timestep, encoder_hidden_states=self.prompt.expand(len(sample), -1, -1))

    torch.manual_seed(SEED)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
        prompt = torch.randn(1, PROMPT_TOKENS, unet.config.cross_attention_dim)
    return FixedPrompt(unet, prompt).eval()


def build_task(args: argparse.Namespace, device: Any) -> Any:
    from diffusers import DDPMScheduler

    import hf_influence as hfi

    return hfi.DiffusionTask(build_denoiser(unet_config(args.scaled_down), device), DDPMScheduler())


def latent_rows(task: Any, count: int) -> list[dict[str, Any]]:
    """`count` rows of seeded random latents (the "images" of a latent-space task) with stable ids."""
    import torch

    generator = torch.Generator().manual_seed(SEED)
    return [{"image": torch.randn(task.sample_shape, generator=generator), "id": i} for i in range(count)]


class Peak:
    """Peak memory since `reset()`: the GPU's allocated bytes, or the process's RSS on the CPU."""

    def __init__(self, device: Any) -> None:
        self.device = device

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
            except OSError:
                pass

    def bytes(self) -> int:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated())
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- hf_influence


def run_hf(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    import hf_influence as hfi
    from hf_influence.curvature.layers import find_layers
    from hf_influence.curvature.statistics import CovarianceAccumulator
    from hf_influence.distributed import Ranks
    from hf_influence.fitting import _Fit

    task = build_task(args, device)
    rows = latent_rows(task, args.draws)
    config = hfi.FactorConfig(strategy="ekfac", batch_size=args.batch_size, seed=SEED)
    layers = find_layers(task.denoiser, config.module_filter)
    peak = Peak(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def covariance_pass(data: list[dict[str, Any]]) -> CovarianceAccumulator:
        covariances = CovarianceAccumulator(layers, config.approx, config.torch_dtype)
        with task.eval_mode(), autocast:
            _Fit(task, data, config, layers, Ranks(None), None).run_pass(
                "fit", covariances, "Fitting covariances", None
            )
        return covariances

    covariance_pass(rows[: args.batch_size])  # warm-up: kernels, allocator
    peak.reset()
    start = time.perf_counter()
    covariances = covariance_pass(rows)
    synchronize(device)
    seconds = time.perf_counter() - start
    sums = sum(float(value.double().trace()) for value in covariances.activation.values())
    return {
        "seconds": seconds,
        "peak_memory_bytes": peak.bytes(),
        "num_layers": len(layers),
        "activation_trace_sum": sums,
        "covariance_bytes": sum(
            value.numel() * value.element_size()
            for store in (covariances.activation, covariances.gradient)
            for value in store.values()
        ),
    }


# ---------------------------------------------------------------------------------------------- kronfluence


def run_kronfluence(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch
    from kronfluence.analyzer import prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.factor import covariance as kron_covariance
    from kronfluence.task import Task
    from kronfluence.utils.state import State
    from torch.utils.data import DataLoader, Dataset

    task = build_task(args, device)
    rows = latent_rows(task, args.draws)
    samples = torch.stack([row["image"] for row in rows])
    drawn = task.draw([row["id"] for row in rows], 1, SEED, "fit", augment=True)
    _, noisy = task.noisy_inputs(samples, drawn, repeats=1)
    data = {"noisy": noisy.cpu(), "timesteps": drawn.timesteps, "probe": drawn.probe}
    probe_scale = math.sqrt(task.sample_numel / 2)

    class Draws(Dataset):
        def __init__(self, count: int) -> None:
            self.count = count

        def __len__(self) -> int:
            return self.count

        def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
            return {key: value[index] for key, value in data.items()}

    class DiffusionLoss(Task):
        """Per-draw `mean((pred − target)²)` summed over the batch; sample=True draws the MC pseudo-target."""

        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            prediction = model(batch["noisy"], batch["timesteps"]).sample.float()
            target = prediction.detach() + probe_scale * batch["probe"]
            return (prediction - target).pow(2).flatten(1).mean(dim=1).sum()

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            raise NotImplementedError

    kron_task = DiffusionLoss()
    model = prepare_model(task.denoiser, kron_task).to(device)  # its tracked modules start on the CPU
    state = State(cpu=device.type == "cpu")
    factor_args = FactorArguments(
        strategy="ekfac",
        use_empirical_fisher=False,
        amp_dtype=torch.bfloat16 if args.precision == "bf16" else None,
        activation_covariance_dtype=torch.float32,
        gradient_covariance_dtype=torch.float32,
    )
    gather = {"seconds": 0.0}
    original_load = kron_covariance.load_factors

    def timed_load(*load_args: Any, **load_kwargs: Any) -> Any:
        synchronize(device)
        start = time.perf_counter()
        result = original_load(*load_args, **load_kwargs)
        gather["seconds"] += time.perf_counter() - start
        return result

    kron_covariance.load_factors = timed_load

    def covariance_pass(count: int) -> Any:
        loader = DataLoader(Draws(count), batch_size=args.batch_size, shuffle=False, num_workers=0)
        return kron_covariance.fit_covariance_matrices_with_loader(
            model=model, state=state, task=kron_task, loader=loader, factor_args=factor_args, disable_tqdm=True
        )

    covariance_pass(args.batch_size)  # warm-up
    peak = Peak(device)
    gather["seconds"] = 0.0
    peak.reset()
    start = time.perf_counter()
    _, factors = covariance_pass(args.draws)
    synchronize(device)
    seconds = time.perf_counter() - start
    activation = factors["activation_covariance"]
    return {
        "seconds": seconds - gather["seconds"],
        "gather_to_cpu_s": gather["seconds"],
        "peak_memory_bytes": peak.bytes(),
        "num_layers": len(activation),
        "covariance_bytes": sum(
            value.numel() * value.element_size() for store in factors.values() for value in store.values()
        ),
    }


# ---------------------------------------------------------------------------------------------- eigh probe


def eigh_seconds(size: int, device: Any) -> float:
    """Wall time of one fp64 eigendecomposition of a random `size` × `size` covariance (what fitting runs
    per layer and factor)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(SEED)
    half = torch.randn(size, size, device=device, dtype=torch.float64, generator=generator) / size**0.5
    matrix = half @ half.T
    synchronize(device)
    start = time.perf_counter()
    torch.linalg.eigh(matrix)
    synchronize(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- processes


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.scaled_down else "cpu")
    result = (run_hf if args.library == "hf" else run_kronfluence)(args, device)
    result["draws_per_second"] = args.draws / result["seconds"]
    Path(args.json_out).write_text(json.dumps(result))


def spawn(library: str, precision: str, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--library",
        library,
        "--precision",
        precision,
        "--draws",
        str(args.draws),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
        "--json-out",
        str(path),
    ]
    if args.scaled_down:
        command.append("--scaled-down")
    print(f"running {library} {precision} ...", flush=True)
    completed = subprocess.run(command, check=False, env={**os.environ, "TQDM_DISABLE": "1"})
    if completed.returncode != 0:
        return {"error": f"exit status {completed.returncode}"}
    result = json.loads(path.read_text())
    print(json.dumps(result), flush=True)
    return result


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "kronfluence"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
    return f"{platform.machine()}, {os.cpu_count()} CPUs (CPU run)"


def parent(args: argparse.Namespace) -> None:
    import tempfile

    import torch

    from hf_influence import FactorConfig
    from hf_influence.planning import plan

    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sd_scale_") as tmp:
        for precision in args.precisions:
            for library in ("hf", "kronfluence"):
                runs[f"{library}_{precision}"] = spawn(library, precision, args, Path(tmp) / f"{library}_{precision}")
    rows = []
    for precision in args.precisions:
        ours, theirs = runs[f"hf_{precision}"], runs[f"kronfluence_{precision}"]
        row = {"precision": precision, "hf_influence": ours, "kronfluence": theirs}
        if "error" not in ours and "error" not in theirs:
            row["speed_ratio_hf_over_kronfluence"] = ours["draws_per_second"] / theirs["draws_per_second"]
            row["memory_ratio_hf_over_kronfluence"] = ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
        rows.append(row)
    config = unet_config(args.scaled_down)
    device = "cuda" if torch.cuda.is_available() and not args.scaled_down else "cpu"
    estimate = plan(config, FactorConfig(batch_size=args.batch_size))
    result = {
        "command": " ".join(["python benchmarks/sd_scale.py", *sys.argv[1:]]).strip(),
        "setup": {
            "model": "SD-1.5 UNet2DConditionModel config (random weights)" if not args.scaled_down else config,
            "latent_shape": [config["in_channels"], config["sample_size"], config["sample_size"]],
            "draws": args.draws,
            "batch_size": args.batch_size,
            "device": device,
            "machine": machine(),
            "versions": versions(),
            "what_is_timed": "the covariance pass (A and G of every Linear/Conv2d layer) over --draws draws after one "
            "warm-up batch; eigendecomposition and the EK-FAC correction pass are not included",
        },
        "plan": {
            "covariance_bytes_fp32": estimate.totals()["activation_covariance"]
            + estimate.totals()["gradient_covariance"],
            "covariance_pass_memory_bytes_fp32": estimate.fitting_phases()["covariance_pass"],
            "estimated_draws_per_second": estimate.draws_per_second,
            "estimate_basis": estimate.throughput_note,
        },
        "runs": rows,
    }
    if args.eigh_sizes:
        result["eigh_fp64_seconds"] = {str(size): eigh_seconds(size, torch.device(device)) for size in args.eigh_sizes}
    if not args.no_save:
        path = RESULTS / f"sd_scale_{'cpu' if device == 'cpu' else 'gpu'}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {path}")
    print_report(result)


def print_report(result: dict[str, Any]) -> None:
    setup = result["setup"]
    print(f"\n{setup['machine']}: {setup['draws']} draws, {setup['batch_size']} per pass\n")
    print("| precision | hf_influence draws/s | kronfluence draws/s | ratio | hf peak GB | kronfluence peak GB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in result["runs"]:
        ours, theirs = row["hf_influence"], row["kronfluence"]
        if "error" in ours or "error" in theirs:
            print(f"| {row['precision']} | {ours.get('error', '')} | {theirs.get('error', '')} | | | |")
            continue
        print(
            f"| {row['precision']} | {ours['draws_per_second']:.2f} | {theirs['draws_per_second']:.2f} | "
            f"{row['speed_ratio_hf_over_kronfluence']:.2f}× | {ours['peak_memory_bytes'] / 1e9:.2f} | "
            f"{theirs['peak_memory_bytes'] / 1e9:.2f} |"
        )
    if "eigh_fp64_seconds" in result:
        print(f"\nfp64 eigh seconds by size: {result['eigh_fp64_seconds']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scaled-down", action="store_true", help="a small UNet on the CPU instead of SD-1.5")
    parser.add_argument("--draws", type=int, default=None, help="timed draws (default 128 GPU, 64 scaled down)")
    parser.add_argument("--batch-size", type=int, default=None, help="draws per pass (default 16 GPU, 16 CPU)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    parser.add_argument("--eigh-sizes", type=int, nargs="*", default=[], help="time one fp64 eigh of each size")
    parser.add_argument("--no-save", action="store_true", help="do not write the JSON result")
    parser.add_argument("--library", choices=("hf", "kronfluence"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.draws = args.draws or (64 if args.scaled_down else 128)
    args.batch_size = args.batch_size or 16
    if args.library:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
