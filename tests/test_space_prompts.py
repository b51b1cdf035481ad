"""The Space with a text-to-image pipeline: a prompt box, generation through the pipeline's own `__call__`,
and the attribution of the generated image with its prompt, equal to the library's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image
from space_app import free_port
from tiny_pipelines import IMAGE_SIZE, digit_dataset, saved_pipeline

import hf_influence as hfi
from hf_influence.explorer import ExplorerConfig, InfluenceExplorer, build_app, serve
from hf_influence.pipelines import load_pipeline

TOP_K = 3


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    root = tmp_path_factory.mktemp("space-prompts")
    saved_pipeline("sd", root / "build")
    paths = {
        "pipeline": root / "build" / "sd",
        "digits": root / "digits",
        "factors": root / "factors",
        "index": root / "index",
    }
    digits = digit_dataset(10)
    digits.save_to_disk(str(paths["digits"]))
    _, task = load_pipeline(paths["pipeline"], caption_column="text", resolution=IMAGE_SIZE)
    hfi.fit_factors(task, digits, hfi.FactorConfig(draws_per_example=1, batch_size=8)).save_pretrained(paths["factors"])
    hfi.build_index(task, digits, hfi.IndexConfig(draws_per_example=2, batch_size=8), output_dir=paths["index"])
    config = ExplorerConfig(
        pipeline=str(paths["pipeline"]), factors=str(paths["factors"]), index=str(paths["index"]),
        dataset=str(paths["digits"]), conditioning="prompts", caption_column="text", sampler="pipeline",
        num_inference_steps=2, top_k=TOP_K,
    )  # fmt: skip
    explorer = InfluenceExplorer.from_config(config)
    app = build_app(explorer)
    _, url, _ = serve(app, config, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True)
    try:
        yield Client(url, verbose=False), explorer, paths, task, digits
    finally:
        app.close()


def test_a_prompt_generates_and_attributes_like_the_library(prompted, tmp_path: Path):
    client, explorer, paths, task, digits = prompted
    prompt = digits[3]["text"]
    outputs = client.predict(5, 2, None, prompt, "loss", 1e-3, TOP_K, api_name="/generate")
    details = outputs[5]
    attributor = hfi.Attributor(
        task,
        hfi.InfluenceFactors.from_pretrained(paths["factors"], task=task),
        hfi.GradientIndex.from_pretrained(paths["index"]),
        damping=1e-3,
    )
    image = explorer.generate(5, 2, prompt=prompt)  # the pipeline's own __call__ with the prompt
    expected = attributor.attribute([image], prompts=[prompt], top_k=TOP_K, seed=0)
    assert [record["id"] for record in details["proponents"]] == expected.proponent_ids[0].tolist()
    np.testing.assert_allclose(
        [record["score"] for record in details["proponents"]],
        expected.proponent_scores[0].tolist(),
        rtol=1e-4,
        atol=1e-7,
    )
    shown = Image.open(outputs[0]).convert("RGB").resize(image.size, Image.NEAREST)
    assert np.array_equal(np.asarray(shown), np.asarray(image.convert("RGB")))
    # Another prompt is another query: its scores differ; an empty prompt is refused by name.
    other = client.predict(5, 2, None, digits[4]["text"], "loss", 1e-3, TOP_K, api_name="/generate")[5]
    assert [r["score"] for r in other["proponents"]] != [r["score"] for r in details["proponents"]]
    with pytest.raises(Exception, match=r"(?i)prompt"):
        client.predict(5, 2, None, "", "loss", 1e-3, TOP_K, api_name="/generate")
