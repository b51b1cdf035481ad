"""`plan`: what fitting, storing and indexing (E)K-FAC factors of a denoiser will cost, before any compute.

The denoiser is built from its config on the meta device (shapes only: no weights, no download) and its
layers are found as fitting finds them (`find_layers` with the FactorConfig's module_filter). One meta
forward and backward pass counts a draw's FLOPs, each layer's weight-sharing positions and the tensors
autograd keeps. From those shapes the plan gives, per layer and in total, the bytes of the covariances,
eigenvectors and eigenvalues under a storage policy, an index entry's bytes under an IndexConfig, the
device memory a fit needs, and a coarse draws-per-second class.

    plan = hfi.plan("sd15")                                   # a shipped preset config
    plan = hfi.plan("runwayml/stable-diffusion-v1-5")         # a pipeline folder or Hub id (config.json only)
    plan = hfi.plan(pipe.unet, hfi.FactorConfig(module_filter=hfi.LORA_ONLY))
    print(plan); plan.check_fits(80e9)

One concept per module: `meta` (the denoiser on the meta device, presets), `inputs` (its forward inputs, per
class), `trace` (the meta forward and backward pass), `layer_bytes` (every per-layer byte rule) and
`planner` (`Plan`, `LayerPlan`, `plan`). No module is named `plan`, so the function never shadows one.
"""

from .inputs import meta_inputs
from .meta import PRESETS, denoiser_on_meta, preset_config
from .planner import LayerPlan, Plan, plan

__all__ = ["PRESETS", "LayerPlan", "Plan", "denoiser_on_meta", "meta_inputs", "plan", "preset_config"]
