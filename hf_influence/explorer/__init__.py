"""The Influence Explorer: a Gradio app that generates an image with a diffusers pipeline (or takes an
uploaded one) and shows the training examples that made it: the top proponents and opponents with
their scores and dataset rows, and the distribution of the scores over the whole training set.

- `config`: `ExplorerConfig` (what it loads, how it answers) and `config_from_environment` (`HFI_*`).
- `engine`: `InfluenceExplorer`, the engine without Gradio: generation is the pipeline's own sampling
  and scores are `Attributor.attribute`'s, so the app shows exactly what the Python API returns.
- `uploads`: an uploaded file, checked and converted into the model's query image.
- `app`: `build_app` lays the engine out as `gr.Blocks`; `serve` launches it with the queue on.
"""

from ..validation import check_damping, check_integer
from .app import build_app, serve, theme, user_errors
from .config import ENVIRONMENT_PREFIX, ExplorerConfig, config_from_environment
from .engine import HISTOGRAM_BINS, MAX_SEED, Explanation, InfluenceExplorer, score_histogram
from .uploads import UPLOAD_FORMATS, UPLOAD_MODES, load_upload_image

__all__ = [
    "ENVIRONMENT_PREFIX",
    "HISTOGRAM_BINS",
    "MAX_SEED",
    "UPLOAD_FORMATS",
    "UPLOAD_MODES",
    "Explanation",
    "ExplorerConfig",
    "InfluenceExplorer",
    "build_app",
    "check_damping",
    "check_integer",
    "config_from_environment",
    "load_upload_image",
    "score_histogram",
    "serve",
    "theme",
    "user_errors",
]
