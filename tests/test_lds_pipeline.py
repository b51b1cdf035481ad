"""The whole LDS pipeline at toy scale: subsets → retraining (resumable) → measurements with common
random numbers → saved ground truth → LDS of baseline scores (library and `hf-influence lds`) →
retraining without the top-k examples against random removal."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from hf_influence import TrainConfig, train_ddpm
from hf_influence.baselines import gradient_dot_scores, pixel_similarity_scores
from hf_influence.cli import main
from hf_influence.evaluation import (
    GroundTruth,
    build_ground_truth,
    exact_retraining_ceiling,
    lds,
    measure,
    random_subsets,
    retrain_without,
    top_k_removal,
)
from hf_influence.evaluation import retraining as retraining_module
from hf_influence.evaluation.ground_truth import load_model_task


def tiny_config() -> TrainConfig:
    return TrainConfig(
        resolution=8,
        channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        max_steps=3,
        batch_size=8,
        learning_rate=1e-3,
        lr_warmup_steps=0,
        checkpoint_every=0,
    )


def test_lds_pipeline_end_to_end(tmp_path, digits8, monkeypatch, capsys):
    train = digits8.select(range(16))
    queries = [row["image"] for row in digits8.select(range(28, 30))]
    subsets = random_subsets(len(train), alpha=0.5, count=4, seed=0)
    config = tiny_config()
    ground_truth = build_ground_truth(
        train, queries, config, subsets, seeds=[0, 1], output_dir=tmp_path / "lds", draws_per_query=8, batch_size=16
    )
    assert ground_truth.measurements.shape == (4, 2, 2)
    assert torch.isfinite(ground_truth.measurements).all()
    # Different subsets and seeds give different models.
    assert ground_truth.measurements.flatten().unique().numel() == 16
    record = json.loads((tmp_path / "lds" / "models" / "subset-0002" / "seed-1" / "retraining.json").read_text())
    assert record["kept"] == torch.nonzero(subsets[2]).flatten().tolist() and record["seed"] == 1

    # Finished models are skipped and their measurements read back: a second run trains nothing.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished model was retrained")

    monkeypatch.setattr(retraining_module, "train_ddpm", no_training)
    again = build_ground_truth(
        train, queries, config, subsets, seeds=[0, 1], output_dir=tmp_path / "lds", draws_per_query=8, batch_size=16
    )
    assert torch.equal(again.measurements, ground_truth.measurements)
    monkeypatch.undo()

    # A folder trained on other rows is refused rather than silently reused.
    with pytest.raises(FileExistsError, match="other rows"):
        retrain_without(train, config, [0, 1], tmp_path / "lds" / "models" / "subset-0000" / "seed-0")

    loaded = GroundTruth.from_pretrained(tmp_path / "lds" / "ground_truth")
    train_ddpm(train, config, tmp_path / "full")
    task = load_model_task(tmp_path / "full")
    scores = {
        "pixel": pixel_similarity_scores(task, loaded.queries, train),
        "gradient_dot": gradient_dot_scores(task, loaded.queries, train, draws_per_query=4, draws_per_example=4),
    }
    for name, matrix in scores.items():
        assert matrix.shape == (2, 16), name
        result = lds(matrix, loaded)
        assert -1 <= result.mean <= 1 and result.per_query.shape == (2,)
    assert -1 <= exact_retraining_ceiling(loaded).mean <= 1

    save_file({name: value.contiguous() for name, value in scores.items()}, tmp_path / "scores.safetensors")
    main(
        [
            "lds",
            "--ground-truth",
            str(tmp_path / "lds" / "ground_truth"),
            "--scores",
            str(tmp_path / "scores.safetensors"),
            "--output",
            str(tmp_path / "lds.json"),
        ]
    )
    printed = capsys.readouterr().out
    assert "pixel: LDS" in printed and "exact retraining (ceiling)" in printed
    written = json.loads((tmp_path / "lds.json").read_text())
    assert written["pixel"]["mean"] == pytest.approx(lds(scores["pixel"], loaded).mean)

    top = top_k_removal(
        train,
        config,
        scores["pixel"],
        loaded.queries,
        3,
        tmp_path / "removal",
        tmp_path / "full",
        query_indices=[1],
        method="pixel",
        draws_per_query=8,
    )
    random = top_k_removal(
        train,
        config,
        None,
        loaded.queries,
        3,
        tmp_path / "removal",
        tmp_path / "full",
        query_indices=[1],
        draws_per_query=8,
    )
    assert top.removed == [sorted(scores["pixel"][1].topk(3).indices.tolist())]
    assert random.method == "random" and len(random.removed[0]) == 3 and random.removed != top.removed
    for result in (top, random):
        assert result.retrained.shape == (1, 1) and torch.isfinite(result.increase).all()
        # Query 1 is measured with its own common random numbers on every model, as in the ground truth.
        assert result.full[0] == measure(task, loaded.queries, draws_per_query=8, batch_size=16)[1]
    full_again = top_k_removal(
        train,
        config,
        scores["pixel"],
        loaded.queries,
        3,
        tmp_path / "removal",
        tmp_path / "full",
        query_indices=[1],
        draws_per_query=8,
    )
    assert torch.equal(full_again.retrained, top.retrained)  # the same removed set reuses its model
