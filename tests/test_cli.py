"""The scripts and the `hf-influence` entry point, run as a user would: subprocesses on saved folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import mnist_dataset, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

import hf_influence as hfi
from hf_influence.datasets_io import load_training_dataset

ROOT = Path(__file__).resolve().parents[1]
TOP_K = 3
COUNT = 24
# One thread per process, and this checkout's package even when the editable install points elsewhere.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "true"}
FIT_OPTIONS = ["--strategy", "ekfac", "--batch-size", "16", "--seed", "3"]
INDEX_OPTIONS = ["--num-draws", "2", "--batch-size", "16", "--shard-size", "10"]


def run(*command: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return run(sys.executable, str(ROOT / "scripts" / name), *args)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved pipeline and dataset, then the factors and index the scripts build from them."""
    root = tmp_path_factory.mktemp("cli")
    paths = {name: root / name for name in ("pipeline", "dataset", "factors", "index")}
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(paths["pipeline"])
    mnist_dataset(COUNT, 8).save_to_disk(str(paths["dataset"]))
    data = ["--pipeline", str(paths["pipeline"]), "--dataset", str(paths["dataset"])]
    script("fit_factors.py", *data, *FIT_OPTIONS, "--output-dir", str(paths["factors"]))
    script("build_index.py", *data, *INDEX_OPTIONS, "--output-dir", str(paths["index"]))
    return paths


def test_help_exits_cleanly() -> None:
    assert "fit-factors" in run("hf-influence", "--help").stdout
    assert "--draws-per-example" in run(sys.executable, "-m", "hf_influence.cli", "fit-factors", "--help").stdout
    assert "--projection-dim" in script("build_index.py", "--help").stdout


def test_factors_and_index_load(workspace: dict[str, Path]) -> None:
    task = hfi.DiffusionTask.from_pretrained(str(workspace["pipeline"]))
    factors = hfi.InfluenceFactors.from_pretrained(workspace["factors"], task=task)
    assert factors.strategy == "ekfac" and factors.config.seed == 3
    index = hfi.GradientIndex.from_pretrained(workspace["index"])
    assert len(index) == COUNT
    assert index.config.draws_per_example == 2


def test_build_index_under_a_byte_budget_with_factors(workspace: dict[str, Path], tmp_path: Path) -> None:
    data = ["--pipeline", str(workspace["pipeline"]), "--dataset", str(workspace["dataset"])]
    done = run(
        "hf-influence", "build-index", *data, *INDEX_OPTIONS, "--output-dir", str(tmp_path),
        *("--factors", str(workspace["factors"]), "--max-bytes-per-example", "8000"),
    )  # fmt: skip
    index = hfi.GradientIndex.from_pretrained(tmp_path)
    assert index.config.compression == "eigenbasis" and index.metadata.bytes_per_example <= 8000
    assert f"(eigenbasis, {index.metadata.bytes_per_example} bytes each)" in done.stdout


def test_attribute_matches_the_library(workspace: dict[str, Path], tmp_path: Path) -> None:
    dataset = load_training_dataset(str(workspace["dataset"]))
    query_file = tmp_path / "query.png"
    dataset[5]["image"].save(query_file)
    output = tmp_path / "out"
    done = script(
        "attribute.py",
        *("--pipeline", str(workspace["pipeline"]), "--dataset", str(workspace["dataset"])),
        *("--factors", str(workspace["factors"]), "--index", str(workspace["index"])),
        *("--image", str(query_file), "--damping", "1e-3", "--top-k", str(TOP_K), "--output-dir", str(output)),
    )
    assert "proponents" in done.stdout and "label=" in done.stdout

    (record,) = json.loads((output / "attribution.json").read_text())["queries"]
    proponents, opponents = record["proponents"], record["opponents"]
    assert len(proponents["ids"]) == len(opponents["ids"]) == TOP_K
    assert proponents["scores"] == sorted(proponents["scores"], reverse=True)
    assert opponents["scores"] == sorted(opponents["scores"])

    task = hfi.DiffusionTask.from_pretrained(str(workspace["pipeline"]))
    attributor = hfi.Attributor(
        task,
        hfi.InfluenceFactors.from_pretrained(workspace["factors"]),
        hfi.GradientIndex.from_pretrained(workspace["index"]),
        damping=1e-3,
    )
    expected = attributor.attribute(Image.open(query_file), top_k=TOP_K)
    assert proponents["ids"] == expected.proponent_ids[0].tolist()
    assert opponents["ids"] == expected.opponent_ids[0].tolist()
    torch.testing.assert_close(torch.tensor(proponents["scores"]), expected.proponent_scores[0], rtol=1e-5, atol=0)

    with Image.open(output / record["grid"]) as grid:
        assert grid.size == (TOP_K * 64, 3 * 64)  # 8-pixel digits scaled up 8x


def test_generated_queries(workspace: dict[str, Path], tmp_path: Path) -> None:
    script(
        "attribute.py",
        *("--pipeline", str(workspace["pipeline"]), "--dataset", str(workspace["dataset"])),
        *("--factors", str(workspace["factors"]), "--index", str(workspace["index"])),
        *("--generate", "2", "--seed", "1", "--num-inference-steps", "2", "--top-k", "2"),
        *("--output-dir", str(tmp_path)),
    )
    queries = json.loads((tmp_path / "attribution.json").read_text())["queries"]
    assert [query["query"] for query in queries] == ["generated seed=1 #0", "generated seed=1 #1"]
    assert all((tmp_path / query["grid"]).is_file() for query in queries)


def test_accelerate_launch_two_processes(workspace: dict[str, Path], tmp_path: Path) -> None:
    """The real launcher, two CPU processes (gloo): the factors of one process, up to float rounding."""
    launcher = shutil.which("accelerate")
    assert launcher is not None, "the accelerate launcher is not on PATH"
    run(
        launcher,
        *("launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"),
        str(ROOT / "scripts" / "fit_factors.py"),
        *("--pipeline", str(workspace["pipeline"]), "--dataset", str(workspace["dataset"])),
        *FIT_OPTIONS,
        *("--output-dir", str(tmp_path)),
    )
    single = hfi.InfluenceFactors.from_pretrained(workspace["factors"])
    launched = hfi.InfluenceFactors.from_pretrained(tmp_path)
    assert launched.metadata.total_draws == single.metadata.total_draws == COUNT
    covariances = [name for name in single.tensors if name.endswith("_covariance")]
    assert covariances
    for name in covariances:
        torch.testing.assert_close(launched.tensors[name], single.tensors[name], rtol=1e-5, atol=1e-7)


def test_class_column_is_a_deprecated_alias_of_label_column() -> None:
    from hf_influence.cli import build_parser

    common = ["--pipeline", "p", "--dataset", "d", "--output-dir", "o"]
    assert build_parser().parse_args(["fit-factors", *common, "--label-column", "digit"]).label_column == "digit"
    with pytest.warns(FutureWarning, match="--class-column is deprecated; use --label-column"):
        args = build_parser().parse_args(["build-index", *common, "--class-column", "digit"])
    assert args.label_column == "digit"
    # Printed by the command too (argparse then stops: the other options are missing).
    done = subprocess.run(
        ["hf-influence", "attribute", "--class-column", "digit"], cwd=ROOT, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 2 and "FutureWarning: --class-column is deprecated; use --label-column" in done.stderr


def failing(*command: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, f"{' '.join(command)} succeeded:\n{done.stdout}"
    return done


def snapshot(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_errors_are_one_line_with_the_usage_exit_status(workspace: dict[str, Path], tmp_path: Path) -> None:
    missing = failing("hf-influence", "fit-factors", "--pipeline", "./no-such-pipeline", "--dataset", "./none",
                      "--output-dir", str(tmp_path / "factors"))  # fmt: skip
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines()[0] == (
        "error: No such folder: ./no-such-pipeline (the pipeline folder or Hub model repo; a Hub repo id looks "
        "like 'owner/name')."
    )
    not_a_pipeline = failing("hf-influence", "build-index", "--pipeline", str(workspace["dataset"]), "--dataset",
                             str(workspace["dataset"]), "--output-dir", str(tmp_path / "index"))  # fmt: skip
    assert not_a_pipeline.returncode == 2 and "has no model_index.json" in not_a_pipeline.stderr
    # --debug, or HFI_DEBUG=1, shows the traceback.
    debug = failing("hf-influence", "fit-factors", "--pipeline", "./no-such-pipeline", "--dataset", "./none",
                    "--output-dir", str(tmp_path / "factors"), "--debug")  # fmt: skip
    assert "Traceback" in debug.stderr and "FileNotFoundError: No such folder" in debug.stderr
    debug = failing("hf-influence", "fit-factors", "--pipeline", "./no-such-pipeline", "--dataset", "./none",
                    "--output-dir", str(tmp_path / "factors"), env={**ENV, "HFI_DEBUG": "1"})  # fmt: skip
    assert "Traceback" in debug.stderr


def test_outputs_that_hold_something_else_are_refused_before_any_work(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    data = ["--pipeline", str(workspace["pipeline"]), "--dataset", str(workspace["dataset"])]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    done = failing("hf-influence", "fit-factors", *data, "--output-dir", str(a_file))
    assert done.returncode == 2 and f"{a_file} is a file" in done.stderr and a_file.read_text() == "mine"
    # The pipeline's own folder, an index where factors go, factors where an index goes, a pipeline for training.
    cases = [
        ("fit-factors", workspace["pipeline"], "a diffusers pipeline"),
        ("fit-factors", workspace["index"], "hf_influence.index"),
        ("build-index", workspace["factors"], "hf_influence.factors"),
        ("train-ddpm", workspace["pipeline"], "a diffusers pipeline"),
    ]
    for command, folder, holds in cases:
        before = snapshot(folder)
        arguments = [str(workspace["dataset"])] if command == "train-ddpm" else data
        done = failing("hf-influence", command, *arguments, "--output-dir", str(folder))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"{folder} already holds" in done.stderr and holds in done.stderr and "--overwrite" in done.stderr
        assert snapshot(folder) == before
