"""`hf-influence demo` on a tiny recipe: the first run builds every artifact, a second run takes them all
from the cache, and a changed setting or a damaged artifact redoes that stage and what depends on it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import Crash

import hf_influence as hfi
from hf_influence.cli import main
from hf_influence.demo import DemoConfig, prepare_demo

TINY = {
    "num_examples": 40,
    "resolution": 8,
    "block_out_channels": (8, 16, 16),
    "train_steps": 6,
    "train_batch_size": 8,
    "factor_draws": 1,
    "index_draws": 2,
    "index_rank": 2,
    # One thread, as the rest of the test session: an OpenMP team of 2 started in this process would be inherited,
    # broken, by the processes `debug_launcher` forks later (libgomp is not fork-safe), which then hang.
    "threads": 1,
}
TINY_ARGS = [
    "--num-examples", "40", "--resolution", "8", "--block-out-channels", "8", "16", "16", "--train-steps", "6",
    "--train-batch-size", "8", "--factor-draws", "1", "--index-draws", "2", "--index-rank", "2", "--threads", "1",
]  # fmt: skip
KEY_FILES = {
    "digits": "state.json",
    "ddpm": "unet/diffusion_pytorch_model.safetensors",
    "factors": "factors.safetensors",
    "index": "config.json",
}


def stamps(cache: Path) -> dict[str, int]:
    return {stage: (cache / stage / name).stat().st_mtime_ns for stage, name in KEY_FILES.items()}


def test_demo_builds_once_then_starts_from_the_cache(tmp_path, capsys):
    cache = tmp_path / "demo"
    artifacts = prepare_demo(DemoConfig(**TINY), cache)
    digits = artifacts.dataset
    assert len(digits) == 40 and digits["id"] == list(range(40)) and digits[0]["image"].size == (8, 8)
    assert sorted(set(digits["label"])) == list(range(10))
    assert len(artifacts.index) == 40 and artifacts.index.config.compression == "svd"
    artifacts.index.check_dataset(digits)
    assert artifacts.factors.strategy == "ekfac"
    # Everything fits together: factors and index belong to the trained model.
    result = hfi.Attributor(artifacts.task, artifacts.factors, artifacts.index).attribute(digits[0]["image"], top_k=3)
    assert result.scores.shape == (1, 40)
    first = stamps(cache)
    capsys.readouterr()

    main(["demo", "--no-launch", "--cache-dir", str(cache), *TINY_ARGS])
    output = capsys.readouterr().out
    assert stamps(cache) == first
    for stage in ("Digits", "DDPM", "Factors", "Index"):
        assert f"{stage}: cached in {cache / stage.lower()}" in output

    # Another index setting redoes the index only.
    prepare_demo(DemoConfig(**{**TINY, "index_draws": 1}), cache)
    again = stamps(cache)
    assert {stage for stage in KEY_FILES if again[stage] != first[stage]} == {"index"}

    # A truncated factors file is found out and refitted; the index (of the same model) is kept.
    factors_file = cache / "factors" / "factors.safetensors"
    factors_file.write_bytes(factors_file.read_bytes()[:1000])
    prepare_demo(DemoConfig(**{**TINY, "index_draws": 1}), cache)
    last = stamps(cache)
    assert {stage for stage in KEY_FILES if last[stage] != again[stage]} == {"factors"}

    # Another training setting redoes the model and everything made from it, not the digits.
    prepare_demo(DemoConfig(**{**TINY, "train_steps": 4}), cache)
    retrained = stamps(cache)
    assert {stage for stage in KEY_FILES if retrained[stage] != last[stage]} == {"ddpm", "factors", "index"}


def test_demo_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="num_examples must be between 1 and 5000"):
        DemoConfig(num_examples=6000)
    with pytest.raises(ValueError, match="resolution must be between 4 and 28"):
        DemoConfig(resolution=64)


# The folders the demo makes, in order, and the stage whose record says the demo made them.
OWN_FOLDERS = {
    "digits": "digits",
    "ddpm": "ddpm",
    "factors": "factors",
    "factors-checkpoints": "factors",
    "index": "index",
}


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("demo") / "cache"
    prepare_demo(DemoConfig(**TINY), cache)
    return cache


@pytest.mark.parametrize("folder", list(OWN_FOLDERS))
def test_demo_never_deletes_folders_it_did_not_make(built_cache, tmp_path, folder):
    """The user's own folder where the demo would make one (the README's CLI walkthrough makes such
    folders): refused by name, and every file in the cache is byte-identical afterwards."""
    cache = tmp_path / "cache"
    shutil.copytree(built_cache, cache)
    later = list(OWN_FOLDERS)[list(OWN_FOLDERS).index(folder) :]
    for name in later:  # the demo made the folders before this one (recorded); the rest are not its own
        shutil.rmtree(cache / name, ignore_errors=True)
        (cache / "stages" / f"{OWN_FOLDERS[name]}.json").unlink(missing_ok=True)
    mine = cache / folder / "model_index.json"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own pipeline")
    before = {path: path.read_bytes() for path in cache.rglob("*") if path.is_file()}
    with pytest.raises(FileExistsError, match=f"{folder} already exist.*the demo did not make"):
        prepare_demo(DemoConfig(**TINY), cache)
    assert {path: path.read_bytes() for path in cache.rglob("*") if path.is_file()} == before


def test_interrupted_training_resumes_to_the_uninterrupted_model(tmp_path, monkeypatch):
    """A demo killed during training resumes from the last checkpoint and ends with the same weights."""
    config = DemoConfig(**{**TINY, "train_steps": 8})  # a checkpoint every step
    reference = prepare_demo(config, tmp_path / "whole").task.denoiser.state_dict()

    original, calls = torch.optim.AdamW.step, [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] > 5:
            raise Crash
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(Crash):
        prepare_demo(config, tmp_path / "interrupted")
    checkpoints = tmp_path / "interrupted" / "ddpm" / "checkpoints"
    assert max(int(path.name.split("-")[1]) for path in checkpoints.iterdir()) == 5
    calls[0] = -1000  # count the resumed run's steps without crashing
    resumed = prepare_demo(config, tmp_path / "interrupted")
    assert calls[0] == -1000 + 3  # steps 6, 7 and 8 only: it went on from checkpoint-5
    monkeypatch.undo()
    for name, value in resumed.task.denoiser.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0)
    assert not checkpoints.exists()


@pytest.mark.parametrize(
    ("cpus", "busy", "threads", "expected"),
    [(2, 0.1, None, 2), (2, 1.2, None, 1), (2, 3.0, None, 1), (16, 2.0, None, 4), (2, 0.0, 3, 3)],
)
def test_the_demo_chooses_its_threads_and_gives_them_back(tmp_path, monkeypatch, cpus, busy, threads, expected):
    import hf_influence.demo as demo

    seen = []

    def digits_stage(_demo):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt  # stop the build here

    monkeypatch.setattr(demo.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(demo, "_busy_cores", lambda: busy)
    monkeypatch.setattr(demo, "_digits_stage", digits_stage)
    before = torch.get_num_threads()
    with pytest.raises(KeyboardInterrupt):
        prepare_demo(DemoConfig(**{**TINY, "threads": threads}), tmp_path)
    assert seen == [expected] and torch.get_num_threads() == before


def test_busy_cores_are_measured_from_proc_stat_and_fall_back_to_the_load_average(tmp_path, monkeypatch):
    import hf_influence.demo as demo

    # 2 CPUs; between the readings 150 of 400 ticks were busy (user, system, irq, steal), 250 idle or iowait
    readings = iter(["cpu  100 0 50 800 50 0 0 0 0 0\n", "cpu  200 0 80 1000 100 10 0 10 0 0\n"])
    stat = tmp_path / "stat"
    monkeypatch.setattr(demo, "CPU_STAT", stat)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(demo.time, "sleep", lambda _seconds: stat.write_text(next(readings)))
    stat.write_text(next(readings))
    assert demo._busy_cores() == pytest.approx(2 * 150 / 400)

    monkeypatch.setattr(demo, "CPU_STAT", tmp_path / "missing")  # not Linux
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert demo._busy_cores() == 1.5
