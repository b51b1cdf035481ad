"""Scaling out: streamed datasets from files, a resumed fit over several processes, and the real
`accelerate launch` for the index and attribution scripts."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import test_cli
import torch
from accelerate import Accelerator, debug_launcher
from conftest import Crash, crash_task_after, mnist_dataset, tiny_unet
from diffusers import DDPMScheduler
from PIL import Image

import hf_influence as hfi
from hf_influence.datasets_io import load_training_dataset

# The saved pipeline, dataset, single-process factors and index of test_cli (built once per module).
workspace = test_cli.workspace

KFAC = hfi.FactorConfig(strategy="kfac", draws_per_example=2, batch_size=4, dtype="float64")


def _task() -> hfi.DiffusionTask:
    return hfi.DiffusionTask(tiny_unet().double(), DDPMScheduler())


def _covariances(factors: hfi.InfluenceFactors) -> list[str]:
    names = [name for name in factors.tensors if name.endswith("_covariance")]
    assert names
    return names


# ---------------------------------------------------------------------------- 1. streamed files


def _write_parquet(dataset, root: Path) -> Path:
    path = root / "digits.parquet"
    dataset.to_parquet(str(path))
    return path


def _write_imagefolder(dataset, root: Path) -> Path:
    """PNGs in class subfolders of train/, with a metadata.csv carrying `id` and `label` (with a
    metadata file, imagefolder takes its columns from it instead of inferring labels from folders)."""
    split = root / "digits" / "train"
    split.mkdir(parents=True)
    with open(split / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "id", "label"])
        for row in dataset:
            name = f"{row['label']}/{row['id']:03d}.png"
            (split / name).parent.mkdir(exist_ok=True)
            row["image"].save(split / name)
            writer.writerow([name, row["id"], row["label"]])
    return root / "digits"


def _write_saved(dataset, root: Path) -> Path:
    path = root / "saved"
    dataset.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("write", [_write_parquet, _write_imagefolder, _write_saved])
def test_streamed_files_fit_the_factors_of_the_in_memory_dataset(tmp_path, write):
    dataset = mnist_dataset(12, 8)
    streamed = load_training_dataset(str(write(dataset, tmp_path)), "train", streaming=True)
    rows = list(streamed)
    assert sorted(row["id"] for row in rows) == list(range(12))
    for row in rows:  # the images themselves survive the trip (PNG is lossless)
        assert row["image"].tobytes() == dataset[row["id"]]["image"].tobytes()

    task = _task()
    expected = hfi.fit_factors(task, dataset, KFAC)
    actual = hfi.fit_factors(task, streamed, KFAC)
    assert actual.metadata.total_draws == expected.metadata.total_draws == 24
    for name in _covariances(expected):
        torch.testing.assert_close(actual.tensors[name], expected.tensors[name], rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------- 2. resume on 2 ranks

# 10 examples over 2 ranks (5 each), 2 examples per batch: 3 forward passes per rank and pass.
RESUME_EXAMPLES = 10


def _fit_on_every_rank(directory: str, strategy: str, crash_after: int | None) -> None:
    """Fit with a checkpoint every batch; with `crash_after`, every rank's forward passes fail after
    that many (caught here, so that the launcher does not fail); without it, resume and save."""
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    task = _task()
    config = dataclasses.replace(KFAC, strategy=strategy)
    options = dict(accelerator=accelerator, checkpoint_dir=f"{directory}/checkpoints", checkpoint_every=1)
    dataset = mnist_dataset(RESUME_EXAMPLES, 8)
    if crash_after is None:
        factors = hfi.fit_factors(task, dataset, config, resume=True, **options)
        if accelerator.is_main_process:
            factors.save_pretrained(f"{directory}/factors")
        return
    crash_task_after(task, crash_after)
    try:
        hfi.fit_factors(task, dataset, config, **options)
    except Crash:
        Path(f"{directory}/crashed-rank{rank}").touch()


# kfac: crash in the covariance pass; ekfac: crash in the correction pass (after its first batch).
@pytest.mark.parametrize(("strategy", "crash_after"), [("kfac", 2), ("ekfac", 4)])
def test_two_processes_resume_to_the_factors_of_one(tmp_path, strategy, crash_after):
    debug_launcher(_fit_on_every_rank, args=(str(tmp_path), strategy, crash_after), num_processes=2)
    assert sorted(path.name for path in tmp_path.glob("crashed-rank*")) == ["crashed-rank0", "crashed-rank1"]
    assert sorted(path.name for path in (tmp_path / "checkpoints").glob("*.json")) == [
        "rank-000.json",
        "rank-001.json",
    ]
    debug_launcher(_fit_on_every_rank, args=(str(tmp_path), strategy, None), num_processes=2)

    task = _task()
    single = hfi.fit_factors(task, mnist_dataset(RESUME_EXAMPLES, 8), dataclasses.replace(KFAC, strategy=strategy))
    resumed = hfi.InfluenceFactors.from_pretrained(tmp_path / "factors", task=task)
    assert resumed.metadata.total_draws == single.metadata.total_draws == RESUME_EXAMPLES * 2
    assert resumed.tensors.keys() == single.tensors.keys()
    compared = _covariances(single)
    if strategy == "kfac":  # EK-FAC's corrected eigenvalues depend on the eigenbasis rounding picks
        compared += [name for name in single.tensors if name.endswith("eigenvalues")]
    for name in compared:
        torch.testing.assert_close(resumed.tensors[name], single.tensors[name], rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------- 3. the real launcher

PORT = "29523"  # test_cli's launch uses 29517


def _launch(script: str, *args: str) -> None:
    launcher = shutil.which("accelerate")
    assert launcher is not None, "the accelerate launcher is not on PATH"
    test_cli.run(
        launcher,
        *("launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", PORT),
        str(test_cli.ROOT / "scripts" / script),
        *args,
    )


def test_accelerate_launch_builds_the_index_and_attributes(workspace: dict[str, Path], tmp_path: Path) -> None:
    data = ["--pipeline", str(workspace["pipeline"]), "--dataset", str(workspace["dataset"])]
    _launch("build_index.py", *data, *test_cli.INDEX_OPTIONS, "--output-dir", str(tmp_path / "index"))
    single = hfi.GradientIndex.from_pretrained(workspace["index"])
    launched = hfi.GradientIndex.from_pretrained(tmp_path / "index")
    assert len(launched) == len(single) == test_cli.COUNT
    assert sorted(path.name for path in (tmp_path / "index").iterdir()) == sorted(
        path.name for path in workspace["index"].iterdir()
    )
    for (ids_one, shard_one), (ids_two, shard_two) in zip(single.iter_shards(), launched.iter_shards(), strict=True):
        assert torch.equal(ids_one, ids_two)
        assert shard_one.keys() == shard_two.keys()
        for module, stored in shard_one.items():
            assert stored.keys() == shard_two[module].keys()
            for key, value in stored.items():  # float32 gradients batched otherwise on each rank
                torch.testing.assert_close(shard_two[module][key], value, rtol=1e-4, atol=1e-6)

    query_file = tmp_path / "query.png"
    load_training_dataset(str(workspace["dataset"]))[5]["image"].save(query_file)
    output = tmp_path / "out"
    _launch(
        "attribute.py",
        *data,
        *("--factors", str(workspace["factors"]), "--index", str(tmp_path / "index")),
        *("--image", str(query_file), "--damping", "1e-3", "--top-k", str(test_cli.TOP_K)),
        *("--output-dir", str(output)),
    )
    (record,) = json.loads((output / "attribution.json").read_text())["queries"]
    assert (output / record["grid"]).is_file()

    attributor = hfi.Attributor(
        hfi.DiffusionTask.from_pretrained(str(workspace["pipeline"])),
        hfi.InfluenceFactors.from_pretrained(workspace["factors"]),
        hfi.GradientIndex.from_pretrained(tmp_path / "index"),
        damping=1e-3,
    )
    expected = attributor.attribute(Image.open(query_file), top_k=test_cli.TOP_K)
    assert record["proponents"]["ids"] == expected.proponent_ids[0].tolist()
    assert record["opponents"]["ids"] == expected.opponent_ids[0].tolist()
    for which, scores in (("proponents", expected.proponent_scores[0]), ("opponents", expected.opponent_scores[0])):
        torch.testing.assert_close(torch.tensor(record[which]["scores"]), scores, rtol=1e-5, atol=0)
