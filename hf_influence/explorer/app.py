"""The Gradio app of the Influence Explorer: `build_app` lays an `InfluenceExplorer` out as `gr.Blocks`
(the controls, the results, the events between them) and `serve` launches it with the queue on. Both
the Space (`spaces/influence-explorer/app.py`) and `hf-influence demo` call them. Gradio is imported
only here, and only when an app is built."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..display import upscale
from ..measurements import MEASUREMENTS
from .config import ExplorerConfig
from .engine import MAX_SEED, Explanation, InfluenceExplorer

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

# Fonts installed with every OS: the page must not fetch web fonts (a Space or an offline machine).
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif")
MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace")


@dataclass
class _Controls:
    """The left column: the two ways in (generate, upload), the query's condition and the settings."""

    seed: Any
    steps: Any
    generate: Any
    upload: Any
    attribute: Any
    label: Any
    prompt: Any
    measurement: Any
    damping: Any
    top_k: Any

    @property
    def settings(self) -> list[Any]:
        return [self.measurement, self.damping, self.top_k]


def build_app(explorer: InfluenceExplorer) -> gr.Blocks:
    """The Gradio Blocks of the explorer: a Generate tab, an upload tab, shared settings and the view.

    API endpoints (for `gradio_client`): `/generate` (seed, steps, label, prompt, measurement,
    damping, top_k) and `/attribute` (file, label, prompt, measurement, damping, top_k); both return
    the query image, the proponents' and opponents' galleries, the score histogram, a summary and
    the records as JSON.
    """
    import gradio as gr

    with gr.Blocks(title=explorer.config.title, analytics_enabled=False) as app:
        gr.Markdown(_introduction(explorer))
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                controls = _controls(explorer)
            with gr.Column(scale=2):
                outputs = _results()
        _wire(explorer, controls, outputs)
    return app


def _introduction(explorer: InfluenceExplorer) -> str:
    task = explorer.task
    return (
        f"# {explorer.config.title}\n"
        "Which training examples made this image? Scores are influence functions with EK-FAC curvature "
        "(Mlodozeniec et al., ICLR 2025): **proponents** are the examples whose removal is predicted to "
        "raise the measurement the most (for the loss: to make the image less likely), **opponents** the "
        f"reverse. The model is a {task.channels}-channel {task.resolution[0]}×{task.resolution[1]} "
        f"`{type(explorer.pipeline).__name__}`; {len(explorer.attributor.index)} training examples are indexed."
    )


def _controls(explorer: InfluenceExplorer) -> _Controls:
    import gradio as gr

    config = explorer.config
    with gr.Tabs():
        with gr.Tab("Generate"):
            seed = gr.Number(label=f"Seed (0 to {MAX_SEED})", value=0, elem_id="seed")
            steps = gr.Slider(
                1,
                config.max_inference_steps,
                value=config.num_inference_steps,
                step=1,
                label=f"Sampling steps ({config.sampler})",
            )
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Tab("Attribute your image"):
            upload = gr.File(label="Image (PNG, JPEG, WebP…)", file_types=["image"], elem_id="upload")
            attribute = gr.Button("Attribute", variant="primary", elem_id="attribute")
    # Shown for conditional pipelines only: the class or prompt to generate and attribute with.
    choices = explorer.class_choices()
    label = gr.Dropdown(
        choices=choices,
        value=choices[0][1] if choices else None,
        label="Class label",
        visible=explorer.conditioning == "labels",
        elem_id="class-label",
    )
    prompt = gr.Textbox(label="Prompt", visible=explorer.conditioning == "prompts", elem_id="prompt")
    with gr.Accordion("Attribution settings", open=False):
        measurement = gr.Radio(
            sorted(MEASUREMENTS),
            value=config.measurement,
            label="Measurement",
            info="loss: the training loss of the image; simplified_elbo: its ELBO bound; "
            "square_norm: D-TRAK's squared output norm",
        )
        damping = gr.Number(value=config.damping, label="Damping λ", info="added to the eigenvalues")
        top_k = gr.Slider(1, config.max_top_k, value=config.top_k, step=1, label="Examples shown (k)")
    return _Controls(seed, steps, generate, upload, attribute, label, prompt, measurement, damping, top_k)


def _results() -> list[Any]:
    """The right column, in the order every request returns it: query, proponents, opponents,
    histogram, summary, details."""
    import gradio as gr

    with gr.Row():
        query = gr.Image(label="Query", type="pil", format="png", height=260, interactive=False)
        histogram = gr.BarPlot(
            x="score",
            y="examples",
            label="Scores over the training set",
            height=260,
            x_title="influence score",
            y_title="training examples",
        )
    summary = gr.Markdown(label="Summary", elem_id="summary")
    galleries = [
        gr.Gallery(
            label=f"Top {which} (id · label · score)",
            columns=4,
            height="auto",
            format="png",
            object_fit="contain",
            elem_id=which,
        )
        for which in ("proponents", "opponents")
    ]
    with gr.Accordion("Scores and rows (JSON)", open=False):
        details = gr.JSON(label="Attribution")
    return [query, *galleries, histogram, summary, details]


def _wire(explorer: InfluenceExplorer, controls: _Controls, outputs: list[Any]) -> None:
    """The two requests, each a queued API endpoint sharing one concurrency slot (the model)."""
    import gradio as gr

    def on_generate(seed, steps, label, prompt, measurement, damping, top_k, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        with user_errors():
            progress(0.0, desc="Sampling")
            image = explorer.generate(seed, steps, label, prompt)
            progress(0.5, desc="Attributing")
            explanation = explorer.explain(image, measurement, damping, top_k, label, prompt)
            return _view(explorer, explanation, f"Generated, seed {int(seed)}, {int(steps)} steps")

    def on_attribute(file, label, prompt, measurement, damping, top_k, progress=gr.Progress()):  # noqa: B008 (Gradio injects it)
        with user_errors():
            progress(0.0, desc="Reading the image")
            image = explorer.load_upload(file)
            progress(0.2, desc="Attributing")
            explanation = explorer.explain(image, measurement, damping, top_k, label, prompt)
            return _view(explorer, explanation, f"Uploaded {Path(file).name}")

    condition = [controls.label, controls.prompt]
    gr.on(
        [controls.generate.click],
        on_generate,
        [controls.seed, controls.steps, *condition, *controls.settings],
        outputs,
        api_name="generate",
        concurrency_id="model",
    )
    gr.on(
        [controls.attribute.click],
        on_attribute,
        [controls.upload, *condition, *controls.settings],
        outputs,
        api_name="attribute",
        concurrency_id="model",
    )


def _view(explorer: InfluenceExplorer, explanation: Explanation, source: str) -> tuple:
    """An explanation as the values of the results column."""
    import pandas as pd

    details = {
        "source": source,
        "num_examples": int(explanation.result.scores.shape[1]),
        "seconds": explanation.seconds,
        **explanation.records,
    }
    summary = (
        f"**{source}** · {details['num_examples']} training examples scored in "
        f"{explanation.seconds:.2f} s · top {len(explanation.proponents)} shown."
    )
    return (
        upscale(explanation.query, explorer.config.display_size),
        explanation.proponents,
        explanation.opponents,
        pd.DataFrame(explanation.histogram),
        summary,
        details,
    )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn any failure inside a request into a `gr.Error` with a readable message: the page shows it
    instead of a stack trace and the server goes on serving. Unexpected errors are logged in full."""
    import gradio as gr

    try:
        yield
    except gr.Error:
        raise
    except KeyError as error:
        raise gr.Error(str(error.args[0]) if error.args else repr(error)) from error
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise gr.Error(str(error)) from error
    except Exception as error:
        logger.exception("The request failed")
        raise gr.Error(
            f"Something went wrong ({type(error).__name__}: {error}). Try again or change the settings."
        ) from error


def theme() -> Any:
    """Gradio's default theme on system fonts, so the page fetches nothing from outside."""
    import gradio as gr

    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(MONO_FONTS))


def serve(
    app: gr.Blocks,
    config: ExplorerConfig,
    server_name: str | None = None,
    server_port: int | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
) -> Any:
    """Launch `app` with the queue on (`config.concurrency_limit` requests at once) and uploads capped
    at `config.max_upload_bytes`. Returns what `Blocks.launch` returns (the app, its local URL, ...)."""
    app.queue(default_concurrency_limit=config.concurrency_limit)
    return app.launch(
        server_name=server_name,
        server_port=server_port,
        share=share,
        prevent_thread_lock=prevent_thread_lock,
        max_file_size=config.max_upload_bytes,
        theme=theme(),
        footer_links=["api"],
    )
