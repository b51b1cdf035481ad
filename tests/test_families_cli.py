"""`hf-influence fit-factors → build-index → attribute --prompt` on a tiny SDXL and a tiny Flux, run as a user
would (subprocesses on saved folders), against the library on the same folders."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_pipelines import IMAGE_SIZE, build_pipeline, digit_dataset

import hf_influence as hfi
from hf_influence.pipelines import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
COUNT, TOP_K = 12, 3


def hf_influence(*arguments: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["hf-influence", *arguments], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"hf-influence {' '.join(arguments)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.parametrize(("kind", "family_options"), [("sdxl", []), ("flux", ["--guidance-embedding", "2.0"])])
def test_prompted_attribution_from_the_command_line(tmp_path: Path, kind: str, family_options: list[str]) -> None:
    pipeline_dir, dataset_dir = tmp_path / kind, tmp_path / "digits"
    build_pipeline(kind, tmp_path / "build").save_pretrained(pipeline_dir)
    digit_dataset(COUNT).save_to_disk(str(dataset_dir))
    data = ["--pipeline", str(pipeline_dir), "--dataset", str(dataset_dir), "--caption-column", "text"]
    data += ["--resolution", str(IMAGE_SIZE), *family_options]
    hf_influence("fit-factors", *data, "--draws-per-example", "1", "--batch-size", "6", "--output-dir",
                 str(tmp_path / "factors"))  # fmt: skip
    hf_influence("build-index", *data, "--draws-per-example", "2", "--batch-size", "6", "--output-dir",
                 str(tmp_path / "index"))  # fmt: skip

    dataset = digit_dataset(COUNT)
    query = tmp_path / "query.png"
    dataset[4]["image"].save(query)
    caption = dataset[4]["text"]
    hf_influence("attribute", *data, "--factors", str(tmp_path / "factors"), "--index", str(tmp_path / "index"),
                 "--image", str(query), "--prompt", caption, "--top-k", str(TOP_K), "--damping", "1e-3",
                 "--output-dir", str(tmp_path / "out"))  # fmt: skip
    (record,) = json.loads((tmp_path / "out" / "attribution.json").read_text())["queries"]

    # The library on the same folders, with the same family options, gives the same ranking and scores.
    options = {"guidance_scale": 2.0} if kind == "flux" else {}
    _, task = load_pipeline(pipeline_dir, caption_column="text", resolution=IMAGE_SIZE, conditioning_options=options)
    factors = hfi.InfluenceFactors.from_pretrained(tmp_path / "factors", task=task)
    attributor = hfi.Attributor(task, factors, hfi.GradientIndex.from_pretrained(tmp_path / "index"), damping=1e-3)
    expected = attributor.attribute(Image.open(query), top_k=TOP_K, prompts=[caption])
    assert record["proponents"]["ids"] == expected.proponent_ids[0].tolist()
    torch.testing.assert_close(
        torch.tensor(record["proponents"]["scores"]), expected.proponent_scores[0].float(), rtol=1e-4, atol=1e-8
    )
    assert factors.metadata.model.repo_id == str(pipeline_dir)
