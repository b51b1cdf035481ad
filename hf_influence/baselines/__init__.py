"""Baseline attribution methods (`method.md` §7), with the score convention of `hf_influence`:
`[queries, training examples]` matrices, columns in the training set's order, positive = removing
the example is predicted to increase the query's measurement (the example is a proponent).

* `TRAK` with `TRAKConfig(output_function="loss")` (TRAK) or `"square_norm"` (D-TRAK).
* `DAS`: the Diffusion Attribution Score, TRAK's kernel on the gradient of the mean output, residual-weighted.
* `gradient_dot_scores`: `⟨∇m_q, ∇L_j⟩`, influence without curvature.
* `pixel_similarity_scores`: cosine similarity of the images.
"""

from .das import DAS
from .gradient_dot import gradient_dot_scores
from .pixel_similarity import pixel_similarity_scores
from .trak import TRAK, GaussianProjection, TRAKConfig

__all__ = ["DAS", "TRAK", "GaussianProjection", "TRAKConfig", "gradient_dot_scores", "pixel_similarity_scores"]
