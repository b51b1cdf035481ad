"""The Influence Explorer through its HTTP API (`gradio_client` against the app served on 127.0.0.1):
what it returns equals `Attributor.attribute` called directly, and bad input gets a readable error
while the app goes on serving."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from space_app import TOP_K, build_artifacts, explorer_config, free_port, served_explorer

import hf_influence as hfi
from hf_influence.datasets_io import load_training_dataset
from hf_influence.explorer import (
    ExplorerConfig,
    InfluenceExplorer,
    config_from_environment,
    load_upload_image,
    score_histogram,
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return build_artifacts(tmp_path_factory.mktemp("space"))


@pytest.fixture(scope="module")
def server(artifacts):
    with served_explorer(artifacts) as (url, explorer):
        yield Client(url, verbose=False), explorer


@pytest.fixture(scope="module")
def direct(artifacts):
    """The same artifacts loaded independently of the app: a pipeline with a DDIM sampler and an Attributor."""
    pipeline = DiffusionPipeline.from_pretrained(artifacts["pipeline"])
    task = hfi.DiffusionTask.from_pipeline(pipeline)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    factors = hfi.InfluenceFactors.from_pretrained(artifacts["factors"], task=task)
    attributor = hfi.Attributor(task, factors, hfi.GradientIndex.from_pretrained(artifacts["index"]))
    return pipeline, attributor, load_training_dataset(artifacts["digits"])


def shown_pixels(path: str, size: int) -> np.ndarray:
    """The model-resolution pixels of an image the app scaled up by a whole factor (nearest neighbour)."""
    shown = np.asarray(Image.open(path).convert("L"))
    factor = shown.shape[0] // size
    assert shown.shape == (size * factor, size * factor)
    return shown[::factor, ::factor]


def check_view(outputs, image, attributor, dataset, measurement="loss", damping=1e-8, top_k=TOP_K):
    """The app's outputs for `image` are those of `Attributor.attribute`: ids, scores, order, rows, captions."""
    query, proponents, opponents, histogram, summary, details = outputs
    expected = attributor.attribute([image], measurement=measurement, top_k=top_k, damping=damping, seed=0)
    assert np.array_equal(shown_pixels(query, 8), np.asarray(image.convert("L")))
    for which, gallery in (("proponents", proponents), ("opponents", opponents)):
        ids = (expected.proponent_ids if which == "proponents" else expected.opponent_ids)[0].tolist()
        scores = (expected.proponent_scores if which == "proponents" else expected.opponent_scores)[0].tolist()
        records = details[which]
        assert [record["id"] for record in records] == ids
        np.testing.assert_allclose([record["score"] for record in records], scores, rtol=1e-5, atol=1e-6)
        shown = [record["score"] for record in records]
        assert shown == sorted(shown, reverse=which == "proponents")
        assert len(gallery) == top_k
        rows = expected.rows(dataset, 0, which)
        for item, record, row in zip(gallery, records, rows, strict=True):
            assert item["caption"] == f"#{record['id']} · {row['label']} · {record['score']:+.3g}"
            assert record["label"] == str(row["label"])  # ClassLabel names of the digits are "0".."9"
            assert np.array_equal(shown_pixels(item["image"], 8), np.asarray(row["image"]))
    counts = [count for _, count in histogram["data"]]
    assert sum(counts) == len(dataset) == details["num_examples"]
    assert f"{len(dataset)} training examples scored" in summary


def test_generate_then_attribute_equals_the_library(server, direct):
    client, _ = server
    pipeline, attributor, dataset = direct
    outputs = client.predict(7, 10, None, "", "loss", 1e-8, TOP_K, api_name="/generate")
    generator = torch.Generator().manual_seed(7)
    image = pipeline(batch_size=1, generator=generator, num_inference_steps=10, output_type="pil").images[0]
    check_view(outputs, image, attributor, dataset)


def test_measurement_damping_and_k_reach_the_attributor(server, direct):
    client, _ = server
    pipeline, attributor, dataset = direct
    outputs = client.predict(11, 5, None, "", "simplified_elbo", 1e-3, 3, api_name="/generate")
    image = pipeline(
        batch_size=1, generator=torch.Generator().manual_seed(11), num_inference_steps=5, output_type="pil"
    ).images[0]
    check_view(outputs, image, attributor, dataset, measurement="simplified_elbo", damping=1e-3, top_k=3)


def test_uploaded_image_is_attributed(server, direct, tmp_path):
    client, _ = server
    _, attributor, dataset = direct
    digit = dataset[5]["image"]
    digit.save(tmp_path / "digit.png")
    outputs = client.predict(
        handle_file(str(tmp_path / "digit.png")), None, "", "loss", 1e-8, TOP_K, api_name="/attribute"
    )
    check_view(outputs, digit, attributor, dataset)
    # A larger RGB JPEG is converted and scaled to the model's 8×8 greyscale; the view shows what was scored.
    large = digit.convert("RGB").resize((40, 40), Image.NEAREST)
    large.save(tmp_path / "large.jpg", quality=95)
    outputs = client.predict(handle_file(str(tmp_path / "large.jpg")), None, "", "loss", 1e-8, 2, api_name="/attribute")
    scored = load_upload_image(tmp_path / "large.jpg", (8, 8), 1, 10**7, 1024)
    check_view(outputs, scored, attributor, dataset, top_k=2)


def test_concurrent_requests_are_queued_and_each_is_right(server, direct):
    client, _ = server
    pipeline, attributor, dataset = direct
    jobs = {seed: client.submit(seed, 4, None, "", "loss", 1e-8, TOP_K, api_name="/generate") for seed in (1, 2, 3)}
    for seed, job in jobs.items():
        generator = torch.Generator().manual_seed(seed)
        image = pipeline(batch_size=1, generator=generator, num_inference_steps=4, output_type="pil").images[0]
        check_view(job.result(timeout=120), image, attributor, dataset)


def test_eight_concurrent_users_all_get_answers_and_a_failure_breaks_nothing(server, direct):
    """8 users at once (each its own client), each sending a good request, a bad one, then a good one: every
    good request is answered rightly once the queue reaches it, every bad one gets its message."""
    pipeline, attributor, dataset = direct
    url = server[0].src

    def user(seed: int) -> tuple[Any, str, Any]:
        client = Client(url, verbose=False)
        first = client.predict(seed, 2, None, "", "loss", 1e-8, 2, api_name="/generate")
        try:
            client.predict(seed, 2, None, "", "loss", -1.0, 2, api_name="/generate")
            refusal = ""
        except Exception as error:  # gradio_client's AppError carries the app's message
            refusal = str(error)
        return first, refusal, client.predict(seed + 100, 2, None, "", "loss", 1e-8, 2, api_name="/generate")

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = dict(zip(range(8), pool.map(user, range(8)), strict=True))
    for seed, (first, refusal, after) in answers.items():
        assert "damping" in refusal.lower(), refusal
        for request_seed, outputs in ((seed, first), (seed + 100, after)):
            if request_seed in (0, 107):  # two of the 16 answers checked against the library in full
                generator = torch.Generator().manual_seed(request_seed)
                image = pipeline(batch_size=1, generator=generator, num_inference_steps=2, output_type="pil").images[0]
                check_view(outputs, image, attributor, dataset, top_k=2)
            else:
                assert outputs[0] is not None


def bad_files(directory):
    (directory / "notes.txt").write_text("not an image")
    (directory / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    Image.new("L", (3000, 40)).save(directory / "wide.png")  # over the 1024-pixel side limit
    Image.new("CMYK", (8, 8)).save(directory / "print.tiff")
    return {
        "notes.txt": "Invalid file type",
        "fake.png": "fake.png is not a readable image",
        "wide.png": "The image is 3000×40 pixels; the largest side accepted is 1024",
        "print.tiff": "Images in pixel mode 'CMYK' are not accepted",
    }


def test_bad_input_gives_a_message_and_the_app_keeps_serving(server, direct, tmp_path):
    client, _ = server
    pipeline, attributor, dataset = direct
    generate_cases = {
        (-1, 10, "loss", 1e-8, 4): "Seed must be a whole number between 0 and 4294967295, got -1",
        (2**32, 10, "loss", 1e-8, 4): "Seed must be a whole number between 0 and 4294967295",
        (1.5, 10, "loss", 1e-8, 4): "Seed must be a whole number",
        (0, 10, "loss", -1.0, 4): "Damping must be a finite number ≥ 0",
        (0, 0, "loss", 1e-8, 4): "Value 0 is less than minimum value 1",
        (0, 10, "loss", 1e-8, 0): "Value 0 is less than minimum value 1",  # Gradio checks the slider's range
    }
    for (seed, steps, measurement, damping, top_k), message in generate_cases.items():
        with pytest.raises(AppError, match=message):
            client.predict(seed, steps, None, "", measurement, damping, top_k, api_name="/generate")
    for name, message in bad_files(tmp_path).items():
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(tmp_path / name)), None, "", "loss", 1e-8, 4, api_name="/attribute")
    with pytest.raises(AppError, match="Upload an image first"):
        client.predict(None, None, "", "loss", 1e-8, 4, api_name="/attribute")
    outputs = client.predict(0, 3, None, "", "loss", 1e-8, TOP_K, api_name="/generate")
    image = pipeline(
        batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="pil"
    ).images[0]
    check_view(outputs, image, attributor, dataset)


def test_upload_conversion_and_histogram():
    """Palette, RGBA and 16-bit uploads become the model's greyscale; the histogram counts every score once."""
    rgba = Image.new("RGBA", (16, 32), (255, 255, 255, 255))
    rgba.putpixel((8, 16), (0, 0, 0, 255))
    for image in (rgba, rgba.convert("P"), Image.new("I;16", (20, 20), 65535)):
        path = f"/tmp/hfi-upload-{image.mode.replace(';', '')}.png"
        image.save(path)
        loaded = load_upload_image(path, (8, 8), 1, 10**6, 64)
        assert loaded.mode == "L" and loaded.size == (8, 8)
        assert np.asarray(loaded).max() == 255
    scores = torch.tensor([-2.0, -1.0, 0.0, 0.0, 3.0, 3.0, 3.0])
    histogram = score_histogram(scores, bins=5)
    assert sum(histogram["examples"]) == len(scores)
    assert histogram["examples"][-1] == 3 and histogram["examples"][0] == 1
    assert math.isclose(histogram["score"][0], -2.0 + 0.5)


def serve_app(app: Path, environment: dict[str, str]) -> tuple[subprocess.Popen, Client]:
    """Run a Space's app.py as a Space runs it (in its folder, on a free local port) until it answers."""
    port = free_port()
    environment = {
        **environment,
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1",
    }
    process = subprocess.Popen(
        [sys.executable, str(app)], cwd=app.parent, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            return process, Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:  # not listening yet
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError(process.stdout.read().decode()) from None
            time.sleep(0.5)


def test_space_app_serves_from_environment_variables(artifacts, direct, tmp_path):
    """spaces/influence-explorer/app.py, run as a Space runs it: configured by HFI_* variables."""
    _, attributor, dataset = direct
    environment = {
        **os.environ,
        **{f"HFI_{name.upper()}": path for name, path in artifacts.items() if name != "digits"},
        "HFI_DATASET": artifacts["digits"],
        "HFI_TOP_K": "3",
    }
    process, client = serve_app(Path(__file__).parents[1] / "spaces" / "influence-explorer" / "app.py", environment)
    try:
        digit = dataset[9]["image"]
        path = tmp_path / "digit.png"
        digit.save(path)
        outputs = client.predict(handle_file(str(path)), None, "", "loss", 1e-8, 3, api_name="/attribute")
        check_view(outputs, digit, attributor, dataset, top_k=3)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_one_command_deploys_a_space_that_serves(hub, artifacts, direct, tmp_path):
    """`hf-influence space --push-to-hub` against the local Hub: the Space repo holds the app, its card, the
    requirements, the package and the settings; its snapshot, run as a Space runs it (no HFI_ variables, the
    package imported from beside app.py), answers like the library."""
    from huggingface_hub import snapshot_download

    _, attributor, dataset = direct
    repo = f"hub-tester/explorer-{uuid.uuid4().hex[:8]}"
    command = ["hf-influence", "space", "--push-to-hub", repo, "--top-k", "3"]
    for name in ("pipeline", "factors", "index"):
        command += [f"--{name}", artifacts[name]]
    command += ["--dataset", artifacts["digits"]]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_TOKEN": hub.token}
    )
    assert done.returncode == 0, done.stderr
    files = set(hub.api.list_repo_files(repo, repo_type="space"))
    assert {"app.py", "README.md", "requirements.txt", "explorer.json", "hf_influence/__init__.py"} <= files
    assert "hf_influence/explorer/deploy.py" in files and not any("__pycache__" in name for name in files)
    folder = Path(snapshot_download(repo, repo_type="space", cache_dir=tmp_path / "cache"))
    assert "sdk: gradio" in (folder / "README.md").read_text()

    environment = {name: value for name, value in os.environ.items() if not name.startswith(("HFI_", "PYTHONPATH"))}
    process, client = serve_app(folder / "app.py", environment)
    try:
        digit = dataset[2]["image"]
        digit.save(tmp_path / "digit.png")
        outputs = client.predict(
            handle_file(str(tmp_path / "digit.png")), None, "", "loss", 1e-8, 3, api_name="/attribute"
        )
        check_view(outputs, digit, attributor, dataset, top_k=3)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_config_from_environment():
    names = {"HFI_PIPELINE": "p", "HFI_FACTORS": "f", "HFI_INDEX": "i", "HFI_DATASET": "d"}
    assert config_from_environment({}) is None
    config = config_from_environment({**names, "HFI_TOP_K": "5", "HFI_DAMPING": "1e-6", "HFI_DRAWS_PER_QUERY": "3"})
    assert (config.pipeline, config.top_k, config.damping, config.draws_per_query) == ("p", 5, 1e-6, 3)
    with pytest.warns(FutureWarning, match=r"num_query_draws=\.\.\.\) is deprecated: use draws_per_query"):
        assert config_from_environment({**names, "HFI_NUM_QUERY_DRAWS": "3"}).draws_per_query == 3
    with pytest.raises(ValueError, match="missing: HFI_FACTORS, HFI_INDEX, HFI_DATASET"):
        config_from_environment({"HFI_PIPELINE": "p"})
    with pytest.raises(ValueError, match="HFI_TOP_K='many' is not a valid int"):
        config_from_environment({**names, "HFI_TOP_K": "many"})
    # Every variable is checked when the Space starts, named as the Space's settings name it.
    refused = {
        "HFI_DAMPING": ("nan", "HFI_DAMPING must be a finite number ≥ 0, got nan"),
        "HFI_TOP_K": ("0", "HFI_TOP_K must be a whole number between 1 and 32, got 0"),
        "HFI_DRAWS_PER_QUERY": ("-2", "HFI_DRAWS_PER_QUERY must be a whole number ≥ 1"),
        "HFI_MEASUREMENT": ("elbo", "HFI_MEASUREMENT must be one of"),
        "HFI_TOPK": ("3", "Unknown setting.s. HFI_TOPK: the explorer reads .*HFI_TOP_K"),
    }
    for variable, (value, message) in refused.items():
        with pytest.raises(ValueError, match=message):
            config_from_environment({**names, variable: value})
    assert config_from_environment({**names, "HFI_DEBUG": "1", "HFI_DEMO_CACHE": "/data"}).pipeline == "p"


def test_class_conditional_pipeline_generates_and_attributes_with_its_label(tmp_path):
    """A DiT: the explorer offers its classes, samples with `class_labels` and attributes with `labels`."""
    from tiny_pipelines import DIGIT_NAMES, digit_dataset, saved_pipeline

    pipeline = saved_pipeline("dit", tmp_path)
    digits = digit_dataset(12)
    task = hfi.DiffusionTask.from_pipeline(pipeline, label_column="label")
    factors = hfi.fit_factors(task, digits, hfi.FactorConfig(draws_per_example=1))
    index = hfi.build_index(task, digits, hfi.IndexConfig(draws_per_example=1), output_dir=tmp_path / "index")
    # guidance 1: the tiny DiT has no null class at DiTPipeline's id 1000.
    config = ExplorerConfig("dit", "factors", "index", "digits", conditioning="labels", top_k=3, guidance_scale=1.0)
    explorer = InfluenceExplorer(pipeline, hfi.Attributor(task, factors, index), digits, config)
    assert explorer.conditioning == "labels"
    assert explorer.class_choices() == [(name, label) for label, name in enumerate(DIGIT_NAMES)]

    image = explorer.generate(5, 4, label=3)
    direct = DiffusionPipeline.from_pretrained(tmp_path / "dit")
    direct.scheduler = DDIMScheduler.from_config(direct.scheduler.config)
    expected_image = direct(
        class_labels=[3],
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(5),
        num_inference_steps=4,
        output_type="pil",
    ).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected_image))

    explanation = explorer.explain(image, label=3)
    expected = hfi.Attributor(task, factors, index).attribute([image], top_k=3, labels=[3])
    assert [record["id"] for record in explanation.records["proponents"]] == expected.proponent_ids[0].tolist()
    np.testing.assert_allclose(
        [record["score"] for record in explanation.records["proponents"]], expected.proponent_scores[0], rtol=1e-5
    )
    other = explorer.explain(image, label=7)  # the label is part of the query
    assert not np.allclose(other.result.scores, explanation.result.scores)
    with pytest.raises(ValueError, match="class-conditional: choose a class label"):
        explorer.generate(5, 4)
    with pytest.raises(ValueError, match="Class label must be a whole number between 0 and 9"):
        explorer.explain(image, label=12)


def test_failed_and_cancelled_requests_leave_the_app_serving(server, direct, monkeypatch):
    client, explorer = server
    pipeline, attributor, dataset = direct

    def broken(*args, **kwargs):
        raise RuntimeError("the index disk went away")

    monkeypatch.setattr(explorer.attributor, "attribute", broken)
    with pytest.raises(AppError, match=r"Something went wrong \(RuntimeError: the index disk went away\)"):
        client.predict(2, 3, None, "", "loss", 1e-8, TOP_K, api_name="/generate")
    monkeypatch.undo()

    job = client.submit(5, 100, None, "", "loss", 1e-8, TOP_K, api_name="/generate")
    job.cancel()  # the browser tab closed or the user navigated away
    outputs = client.predict(6, 3, None, "", "loss", 1e-8, TOP_K, api_name="/generate")
    image = pipeline(
        batch_size=1, generator=torch.Generator().manual_seed(6), num_inference_steps=3, output_type="pil"
    ).images[0]
    check_view(outputs, image, attributor, dataset)


def test_explorer_loads_hub_ids(hub, artifacts, direct):
    """The Space's usual set-up: pipeline, dataset, factors and index are Hub repos (here the local test Hub)."""
    _, attributor, dataset = direct
    repos = {name: f"hub-tester/space-{name}-{uuid.uuid4().hex[:8]}" for name in ("ddpm", "digits", "factors", "index")}
    DiffusionPipeline.from_pretrained(artifacts["pipeline"]).push_to_hub(repos["ddpm"], token=hub.token)
    dataset.push_to_hub(repos["digits"], token=hub.token)
    hfi.InfluenceFactors.from_pretrained(artifacts["factors"]).push_to_hub(repos["factors"], token=hub.token)
    hfi.GradientIndex.from_pretrained(artifacts["index"]).push_to_hub(repos["index"], token=hub.token)
    config = ExplorerConfig(repos["ddpm"], repos["factors"], repos["index"], repos["digits"], top_k=TOP_K)
    explorer = InfluenceExplorer.from_config(config)
    digit = dataset[20]["image"]
    explanation = explorer.explain(digit)
    expected = attributor.attribute([digit], top_k=TOP_K, seed=0)
    assert [record["id"] for record in explanation.records["opponents"]] == expected.opponent_ids[0].tolist()
    np.testing.assert_allclose(
        [record["score"] for record in explanation.records["opponents"]], expected.opponent_scores[0], rtol=1e-5
    )


def test_the_callers_pipeline_keeps_its_scheduler(artifacts, direct):
    """The DDIM sampler is a pipeline of its own, sharing the components: nothing the caller holds changes."""
    _, attributor, dataset = direct
    pipeline = DiffusionPipeline.from_pretrained(artifacts["pipeline"])
    scheduler = pipeline.scheduler
    explorer = InfluenceExplorer(pipeline, attributor, dataset, explorer_config(artifacts))
    assert pipeline.scheduler is scheduler and type(scheduler).__name__ == "DDPMScheduler"
    assert isinstance(explorer.sampling_pipeline.scheduler, DDIMScheduler)
    assert explorer.sampling_pipeline.unet is pipeline.unet
