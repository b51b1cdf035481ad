"""Saved artifacts across format versions: the committed version-1 folders load and score as they did, the
current version round-trips its typed metadata, and altered files are refused by their checksum."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import mnist_dataset, toy_task
from safetensors.torch import load_file
from torch import nn

import hf_influence as hfi
from hf_influence.evaluation import GroundTruth

V1 = Path(__file__).parent / "fixtures" / "format_v1"


def v1_task() -> hfi.DiffusionTask:
    """The toy denoiser the version-1 fixtures were written for (see fixtures/format_v1/README.md)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.SiLU(), nn.Conv2d(3, 1, 3, padding=1))
    return toy_task(net, 1, 8)


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_version_1_factors_and_index_score_as_they_did(strategy):
    task, digits = v1_task(), mnist_dataset(6, 8)
    factors = hfi.InfluenceFactors.from_pretrained(V1 / f"factors_{strategy}", task=task)
    index = hfi.GradientIndex.from_pretrained(V1 / "index")
    assert factors.metadata.total_draws == 12 and factors.strategy == strategy
    assert index.config.draws_per_example == 2 and len(index) == 6
    result = hfi.Attributor(task, factors, index, damping=1e-3).attribute(
        [digits[0]["image"], digits[1]["image"]], draws_per_query=2
    )
    expected = load_file(V1 / "expected_scores.safetensors")[strategy]
    torch.testing.assert_close(result.scores, expected, rtol=1e-6, atol=1e-6)


def test_version_1_factors_equal_a_fit_of_today():
    """The same settings fitted by the current code give the tensors version 1 stored."""
    task = v1_task()
    stored = hfi.InfluenceFactors.from_pretrained(V1 / "factors_ekfac", task=task)
    fitted = hfi.fit_factors(task, mnist_dataset(6, 8), hfi.FactorConfig(draws_per_example=2, seed=1, batch_size=4))
    assert fitted.metadata.shapes == stored.metadata.shapes and fitted.config == stored.config
    for name, value in stored.tensors.items():
        if not name.endswith("eigenvectors"):  # unique only up to sign; compared through the scores above
            torch.testing.assert_close(fitted.tensors[name], value, rtol=1e-5, atol=1e-7)


def test_version_1_ground_truth_loads_with_its_protocol():
    ground_truth = GroundTruth.from_pretrained(V1 / "ground_truth")
    assert ground_truth.protocol.alpha == 0.5 and ground_truth.protocol.draws_per_query == 4
    assert ground_truth.protocol.seeds == (0, 1) and ground_truth.measurements.shape == (2, 2, 3)


def test_resaving_version_1_writes_the_current_format(tmp_path):
    task = v1_task()
    factors = hfi.InfluenceFactors.from_pretrained(V1 / "factors_kfac", task=task)
    factors.save_pretrained(tmp_path / "factors")
    config = json.loads((tmp_path / "factors" / "config.json").read_text())
    assert config["format_version"] == hfi.InfluenceFactors.FORMAT_VERSION and "num_draws" not in config
    assert config["files"]["factors.safetensors"]["blake2b"]  # version 1 had no checksums
    again = hfi.InfluenceFactors.from_pretrained(tmp_path / "factors", task=task)
    assert again.metadata == factors.metadata and again.tensors.keys() == factors.tensors.keys()
    index = hfi.GradientIndex.from_pretrained(V1 / "index")
    index.save_pretrained(tmp_path / "index")
    copy = hfi.GradientIndex.from_pretrained(tmp_path / "index")
    assert copy.metadata == index.metadata and torch.equal(copy.ids(), index.ids())


def test_config_json_is_read_strictly(tmp_path):
    shutil.copytree(V1 / "factors_ekfac", tmp_path / "f")
    path = tmp_path / "f" / "config.json"
    config = json.loads(path.read_text())
    for change, message in [
        ({"format_version": 99}, "format version 99"),
        ({"strategy": "sgd"}, "FactorConfig.strategy must be one of"),
        ({"seed": "one"}, r"config\.json\.config\.seed should be int"),
        ({"model": {"denoiser": "ToyDenoiser"}}, "lacks the field 'fingerprint'"),
        ({"colour": "blue"}, r"unknown fields \['colour'\]"),
    ]:
        path.write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            hfi.InfluenceFactors.from_pretrained(tmp_path / "f")


def test_an_altered_factors_file_is_refused_by_its_checksum(tmp_path):
    task = v1_task()
    hfi.InfluenceFactors.from_pretrained(V1 / "factors_ekfac", task=task).save_pretrained(tmp_path)
    data = bytearray((tmp_path / "factors.safetensors").read_bytes())
    data[-5] ^= 0x01  # one bit of one eigenvalue: the file still parses
    (tmp_path / "factors.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"factors\.safetensors .* does not match its checksum"):
        hfi.InfluenceFactors.from_pretrained(tmp_path)


def test_an_artifact_is_not_saved_over_another_kind(tmp_path):
    index = hfi.GradientIndex.from_pretrained(V1 / "index")
    index.save_pretrained(tmp_path / "index")
    factors = hfi.InfluenceFactors.from_pretrained(V1 / "factors_ekfac")
    before = {path.name: path.read_bytes() for path in (tmp_path / "index").iterdir()}
    with pytest.raises(FileExistsError, match=r"already holds an hf_influence artifact \(hf_influence\.index\)"):
        factors.save_pretrained(tmp_path / "index")
    assert {path.name: path.read_bytes() for path in (tmp_path / "index").iterdir()} == before
