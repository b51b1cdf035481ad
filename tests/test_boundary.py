"""Every bad input of a class gets a one-line error that names the argument, the value and what is accepted,
and nothing that existed before is changed (issue: "nothing a user has is ever lost")."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import Crash, crash_task_after, mnist_dataset, tiny_unet
from diffusers import DDPMScheduler

import hf_influence as hfi


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    dataset = mnist_dataset(8, 8)
    factors = hfi.fit_factors(task, dataset, hfi.FactorConfig(batch_size=16))
    index = hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=1), tmp_path_factory.mktemp("index"))
    return task, dataset, factors, index


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda: hfi.FactorConfig(draws_per_example=0),
            ValueError,
            r"draws_per_example must be a whole number ≥ 1, got 0",
        ),
        (lambda: hfi.FactorConfig(batch_size=2.5), TypeError, r"batch_size must be a whole number ≥ 1, got 2\.5"),
        (lambda: hfi.FactorConfig(seed=True), TypeError, r"seed must be a whole number, got True"),
        (
            lambda: hfi.FactorConfig(module_filter="conv[("),
            ValueError,
            r"module_filter='conv\[\(' is not a valid regular",
        ),
        (lambda: hfi.FactorConfig(strategy="sgd"), ValueError, r"strategy must be one of .*'ekfac'.*got 'sgd'"),
        (lambda: hfi.IndexConfig(shard_size=-1), ValueError, r"shard_size must be a whole number ≥ 1, got -1"),
        (lambda: hfi.IndexConfig(quantize_bits=4), ValueError, r"quantize_bits must be one of \(8,\), got 4"),
        (lambda: hfi.IndexConfig(id_column=""), TypeError, r"id_column must be a non-empty string"),
        (lambda: hfi.LossAtTime(2.0), TypeError, r"timestep must be a whole number ≥ 0, got 2\.0"),
        (lambda: hfi.WeightedLoss(torch.tensor([1.0, float("nan")])), ValueError, "finite 1-D tensor"),
    ],
)
def test_configs_refuse_bad_values_by_name(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_numpy_integers_are_integers():
    config = hfi.FactorConfig(draws_per_example=np.int64(3), batch_size=np.int32(8))
    assert config.draws_per_example == 3 and type(config.draws_per_example) is int


@pytest.mark.parametrize("damping", [float("nan"), float("inf"), -1e-3, "1e-3"])
def test_damping_must_be_finite_and_non_negative(setup, damping):
    task, dataset, factors, index = setup
    with pytest.raises((ValueError, TypeError), match="damping must be a finite number ≥ 0"):
        hfi.Attributor(task, factors, index).attribute(dataset[0]["image"], damping=damping)
    with pytest.raises((ValueError, TypeError), match="damping must be a finite number ≥ 0"):
        hfi.Attributor(task, factors, index, damping=damping)
    with pytest.raises((ValueError, TypeError), match="damping must be a finite number ≥ 0"):
        hfi.pairwise_scores(task, factors, dataset[0]["image"], dataset, damping=damping, draws_per_query=1)


def test_counts_of_requests_are_checked(setup):
    task, dataset, factors, index = setup
    attributor = hfi.Attributor(task, factors, index)
    with pytest.raises(ValueError, match="top_k must be a whole number ≥ 1, got 0"):
        attributor.attribute(dataset[0]["image"], top_k=0)
    with pytest.raises(ValueError, match="draws_per_query must be a whole number ≥ 1, got 0"):
        attributor.attribute(dataset[0]["image"], draws_per_query=0)
    with pytest.raises(ValueError, match="batch_size must be a whole number ≥ 1, got 0"):
        attributor.attribute(dataset[0]["image"], batch_size=0)
    result = attributor.attribute(dataset[0]["image"], top_k=np.int64(2))
    with pytest.raises(ValueError, match="query must be a whole number between 0 and 0, got 3"):
        result.rows(dataset, query=3)


def test_arguments_in_the_wrong_order_are_named(setup):
    task, dataset, factors, index = setup
    with pytest.raises(TypeError, match=r"task must be a DiffusionTask, got a Dataset \(the arguments are fit_factors"):
        hfi.fit_factors(dataset, task)
    with pytest.raises(TypeError, match=r"factors must be an InfluenceFactors, got a GradientIndex .* swapped"):
        hfi.Attributor(task, index, factors)
    with pytest.raises(TypeError, match="config must be an IndexConfig, got a FactorConfig"):
        hfi.build_index(task, dataset, hfi.FactorConfig())


def test_datasets_that_are_not_a_split_of_rows_are_refused_with_the_fix(setup):
    task, dataset, *_ = setup
    splits = datasets.DatasetDict({"train": dataset, "test": dataset})
    with pytest.raises(
        TypeError, match=r"DatasetDict with splits \['test', 'train'\]: pass one split, e.g. dataset\['test'\]"
    ):
        hfi.fit_factors(task, splits)
    images = [row["image"] for row in dataset]
    with pytest.raises(
        TypeError, match=r"a list of PngImageFile, not of rows: .*Dataset\.from_dict\(\{'image': images"
    ):
        hfi.build_index(task, images)
    with pytest.raises(TypeError, match="is a path"):
        hfi.fit_factors(task, "digits/")
    with pytest.raises(ValueError, match="empty"):
        hfi.fit_factors(task, dataset.select([]))


def test_duplicate_ids_are_refused(setup):
    task, dataset, *_ = setup
    twice = dataset.map(lambda row: {"id": row["id"] % 3})
    with pytest.raises(ValueError, match=r"holds id 0 twice \(rows 0 and 3\)"):
        hfi.fit_factors(task, twice)


def test_query_values_follow_the_dtype_rule():
    task = hfi.DiffusionTask(tiny_unet(), DDPMScheduler())
    digit = np.asarray(mnist_dataset(1, 8)[0]["image"])
    as_uint8 = task.preprocess(digit)
    torch.testing.assert_close(as_uint8, task.preprocess(torch.from_numpy(digit)[None]))  # uint8 tensors too
    with pytest.raises(ValueError, match=r"float values in \[0, 2\d\d\]; float images must be in \[-1, 1\] .*uint8"):
        task.preprocess(digit.astype(np.float32))
    with pytest.raises(ValueError, match=r"integer values in \[0, 300\]"):
        task.preprocess(np.arange(64, dtype=np.int64).reshape(8, 8) * 300 // 63)
    with pytest.raises(ValueError, match=r"Image 1 has shape \(C, H, W\) = \(1, 6, 6\), but image 0 has \(1, 8, 8\)"):
        task.preprocess([digit, digit[:6, :6]])


def test_resuming_a_fit_on_other_data_is_refused(tmp_path):
    task = hfi.DiffusionTask(tiny_unet().double(), DDPMScheduler())
    config = hfi.FactorConfig(draws_per_example=2, batch_size=4, dtype="float64")
    crash_task_after(task, 3)
    with pytest.raises(Crash):
        hfi.fit_factors(task, mnist_dataset(10, 8), config, checkpoint_dir=tmp_path, checkpoint_every=1)
    del task.run
    other = mnist_dataset(20, 8).select(range(10, 20)).map(lambda row: {"id": row["id"] - 10})  # the same ids
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="checkpoint was written by a fit on other data"):
        hfi.fit_factors(task, other, config, checkpoint_dir=tmp_path, checkpoint_every=1, resume=True)
    assert snapshot(tmp_path) == before


def test_another_dataset_with_the_same_ids_is_noticed(setup):
    task, dataset, factors, index = setup
    assert (
        index.metadata.dataset.digest.startswith("8:")
        and factors.metadata.dataset.digest == index.metadata.dataset.digest
    )
    impostor = mnist_dataset(16, 8).select(range(8, 16)).map(lambda row: {"id": row["id"] - 8})
    result = hfi.Attributor(task, factors, index).attribute(dataset[0]["image"], top_k=2)
    assert [row["id"] for row in result.rows(dataset)] == result.proponent_ids[0].tolist()
    with pytest.raises(ValueError, match=r"row with id .* is not the row that was indexed"):
        result.rows(impostor)
    index.check_dataset(dataset)
    with pytest.raises(ValueError, match="is not the row that was indexed"):
        index.check_dataset(impostor)


def test_resuming_an_index_on_other_data_is_refused(setup, tmp_path):
    task, dataset, *_ = setup
    config = hfi.IndexConfig(draws_per_example=1, shard_size=4)
    crash_task_after(task, 1)
    try:
        with pytest.raises(Crash):
            hfi.build_index(task, dataset, config, tmp_path)
    finally:
        del task.run
    before = snapshot(tmp_path)
    impostor = mnist_dataset(16, 8).select(range(8, 16)).map(lambda row: {"id": row["id"] - 8})
    with pytest.raises(ValueError, match="partial index of other data"):
        hfi.build_index(task, impostor, config, tmp_path)
    assert snapshot(tmp_path) == before
    assert len(hfi.build_index(task, dataset, config, tmp_path)) == 8  # the right data resumes


def test_saving_into_another_artifact_or_a_pipeline_changes_nothing(setup, tmp_path):
    task, dataset, factors, index = setup
    pipeline = tmp_path / "pipeline"
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(pipeline)
    (pipeline / "README.md").write_text("my model card")
    index.save_pretrained(tmp_path / "index")
    for folder, kind in ((pipeline, "a diffusers pipeline"), (tmp_path / "index", r"an hf_influence artifact")):
        before = snapshot(folder)
        with pytest.raises(FileExistsError, match=f"already holds {kind}"):
            factors.save_pretrained(folder)
        with pytest.raises(FileExistsError, match="already holds"):
            hfi.build_index(task, dataset, hfi.IndexConfig(draws_per_example=1), folder)
        assert snapshot(folder) == before
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        factors.save_pretrained(tmp_path / "a-file")
