"""The Influence Explorer on tiny artifacts, served on 127.0.0.1 for the Space tests (gradio_client and a
real browser): a random 8×8 UNet, 48 real digits, EK-FAC factors and an exact index in two shards."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conftest import mnist_dataset, tiny_unet
from diffusers import DDPMPipeline, DDPMScheduler

import hf_influence as hfi
from hf_influence.explorer import ExplorerConfig, InfluenceExplorer, build_app, serve

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported, by build_app

TOP_K = 4


def build_artifacts(root: Path) -> dict[str, str]:
    """Save a pipeline, its training digits, factors and index under `root`; returns their folders."""
    pipeline = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100))
    paths = {name: str(root / name) for name in ("pipeline", "digits", "factors", "index")}
    pipeline.save_pretrained(paths["pipeline"])
    digits = mnist_dataset(48, 8)
    digits.save_to_disk(paths["digits"])
    task = hfi.DiffusionTask.from_pipeline(pipeline)
    hfi.fit_factors(task, digits, hfi.FactorConfig(draws_per_example=2)).save_pretrained(paths["factors"])
    hfi.build_index(task, digits, hfi.IndexConfig(draws_per_example=2, shard_size=20), output_dir=paths["index"])
    return paths


def explorer_config(paths: dict[str, str]) -> ExplorerConfig:
    return ExplorerConfig(
        pipeline=paths["pipeline"],
        factors=paths["factors"],
        index=paths["index"],
        dataset=paths["digits"],
        top_k=TOP_K,
        num_inference_steps=10,
        max_inference_steps=100,
        max_upload_side=1024,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served_explorer(paths: dict[str, str]) -> Any:
    """(url, explorer) of the app serving on 127.0.0.1; the server is closed on exit."""
    config = explorer_config(paths)
    explorer = InfluenceExplorer.from_config(config)
    app = build_app(explorer)
    _, url, _ = serve(app, config, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True)
    try:
        yield url, explorer
    finally:
        app.close()
