"""The planning package's parts: fused attention is counted by a scoped, thread-local TorchFunctionMode that
leaves `torch.nn.functional` and the mode and hook stacks as they were; the inputs registry."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import hf_influence as hfi
from hf_influence.planning import PRESETS, meta_inputs
from hf_influence.planning.inputs import INPUTS_BY_CLASS, register_inputs
from hf_influence.planning.trace import trace_draw

ORIGINAL_ATTENTION = F.scaled_dot_product_attention


class Attention(nn.Module):
    """Only attention (its key and value passed by keyword), recording what it sees while it runs."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor]:
        other_thread: list[int] = []
        thread = threading.Thread(target=lambda: other_thread.append(len(_get_current_function_mode_stack())))
        thread.start()
        thread.join()
        self.seen = {
            "patched": F.scaled_dot_product_attention is not ORIGINAL_ATTENTION,
            "modes here": len(_get_current_function_mode_stack()),
            "modes in another thread": other_thread[0],
        }
        return (F.scaled_dot_product_attention(query, key=key, value=value),)


def test_fused_attention_is_counted_inside_the_trace_only() -> None:
    with torch.device("meta"):
        query = torch.zeros(2, 3, 5, 4, requires_grad=True)
        key, value = torch.zeros(2, 3, 7, 4, requires_grad=True), torch.zeros(2, 3, 7, 4, requires_grad=True)
    model = Attention()
    trace = trace_draw(model, {"query": query, "key": key, "value": value}, {})
    # q, k, v, the output (shaped like q) and a log-sum-exp per query row; nothing of the math path.
    assert trace.saved_numel == 2 * query.numel() + key.numel() + value.numel() + query[..., 0].numel()
    assert model.seen == {"patched": False, "modes here": 1, "modes in another thread": 0}
    assert F.scaled_dot_product_attention is ORIGINAL_ATTENTION
    assert torch.nn.functional.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert len(_get_current_function_mode_stack()) == 0
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


class Unknown(nn.Module):
    config = SimpleNamespace(sample_size=4, in_channels=2)


def test_meta_inputs_come_from_the_class_registry() -> None:
    with pytest.raises(NotImplementedError, match="No example inputs are known for Unknown"):
        meta_inputs(Unknown(), 1, None)
    register_inputs("Unknown")(lambda config, batch, size: {"sample": torch.zeros(batch, 2, *size)})
    try:
        inputs = meta_inputs(Unknown(), 3, 6)
    finally:
        del INPUTS_BY_CLASS["Unknown"]
    assert inputs["sample"].shape == (3, 2, 6, 6) and inputs["sample"].device.type == "meta"


@pytest.mark.parametrize(
    ("preset", "denoiser"),
    [
        ("flux1-dev-lora", "FluxTransformer2DModel"),
        ("sd35-medium-lora", "SD3Transformer2DModel"),
        ("sd35-large-lora", "SD3Transformer2DModel"),
        ("sdxl-lora", "UNet2DConditionModel"),
        ("pixart-sigma", "PixArtTransformer2DModel"),
    ],
)
def test_full_size_presets_of_every_family_are_planned(preset, denoiser):
    """The families' full-size configs on the meta device; a LoRA preset attributes its adapter only."""
    result = hfi.plan(preset, batch_size=1)
    assert result.model == denoiser and result.layers
    lora = PRESETS[preset].lora_rank is not None
    assert all((".lora_" in layer.name) == lora for layer in result.layers)
    if lora:  # r = 4: lora_A is (4, d_in) and lora_B (d_out, 4)
        assert {min(layer.d_out, layer.d_in) for layer in result.layers} == {4}


def test_module_partitions_bound_the_covariance_pass_by_the_largest_group() -> None:
    """Fitting k groups one after another holds one group's A and G: the covariance pass of the plan is the
    model, a batch's activations and the largest group's covariances (4 bytes per entry, counted here from the
    layer shapes), and a partitioned plan can fit where one pass cannot."""
    whole = hfi.plan("sd15", hfi.FactorConfig(batch_size=1))
    activations = whole.activation_bytes_per_draw
    covariances = {layer.name: 4 * (layer.d_in**2 + layer.d_out**2) for layer in whole.layers}
    for count in (1, 2, 3):
        planned = whole.replace(module_partitions=count)
        largest = planned.fitting_phases()["covariance_pass"] - whole.parameter_bytes - activations
        assert (
            sum(covariances.values()) / count
            <= largest
            <= sum(covariances.values()) / count + max(covariances.values())
        )
    assert whole.replace(module_partitions=4).fitting_memory_bytes < whole.fitting_memory_bytes
