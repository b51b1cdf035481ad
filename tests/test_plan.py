"""`hfi.plan`: factor and index bytes of SD-1.5, SDXL and SD3-medium built on the meta device, checked against
sums computed here from the models' own module weights (not from plan.py's arithmetic)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_unet
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from peft import LoraConfig
from torch import nn

import hf_influence as hfi
from hf_influence.cli import main
from hf_influence.compression import kronecker_projections, make_compressor
from hf_influence.planning import preset_config

MODEL_CLASSES = {"sd15": UNet2DConditionModel, "sdxl": UNet2DConditionModel, "sd3-medium": SD3Transformer2DModel}


def meta_model(preset: str) -> nn.Module:
    with torch.device("meta"):
        return MODEL_CLASSES[preset].from_config(preset_config(preset))


def weight_shapes(model: nn.Module) -> list[tuple[int, int, bool]]:
    """(d_out, d_in, has bias) of every Linear and Conv2d weight, read off named_modules()."""
    return [
        (module.weight.shape[0], module.weight[0].numel(), module.bias is not None)
        for _, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    ]


@pytest.fixture(scope="module")
def sd15_plan() -> hfi.Plan:
    return hfi.plan("sd15", batch_size=8)


@pytest.mark.parametrize("preset", ["sd15", "sdxl", "sd3-medium"])
def test_totals_equal_the_sums_over_the_models_weights(preset: str) -> None:
    shapes = weight_shapes(meta_model(preset))
    totals = hfi.plan(preset).totals()
    assert totals["activation_covariance"] == sum(4 * d_in * d_in for _, d_in, _ in shapes)
    assert totals["gradient_covariance"] == sum(4 * d_out * d_out for d_out, _, _ in shapes)
    assert totals["activation_eigenvectors"] == totals["activation_covariance"]
    assert totals["gradient_eigenvectors"] == totals["gradient_covariance"]
    # EK-FAC: one corrected eigenvalue per weight and per bias, i.e. one per parameter of these layers.
    assert totals["eigenvalues"] == sum(4 * (d_out * d_in + d_out * bias) for d_out, d_in, bias in shapes)
    assert totals["index_per_example"] == totals["eigenvalues"]  # uncompressed fp32 gradients


def test_sd15_full_fp32_factors_are_about_64_gb_and_the_policies_shrink_them(sd15_plan: hfi.Plan) -> None:
    assert len(sd15_plan.layers) == len(weight_shapes(meta_model("sd15")))
    assert max(layer.d_in for layer in sd15_plan.layers) == 23040
    assert abs(sd15_plan.factor_bytes - 64e9) / 64e9 < 0.10
    totals = sd15_plan.totals()
    covariances = totals["activation_covariance"] + totals["gradient_covariance"]
    eigenvectors = totals["activation_eigenvectors"] + totals["gradient_eigenvectors"]
    lean = sd15_plan.replace(keep_covariances=False, eigenvector_dtype="bfloat16")
    assert lean.factor_bytes == eigenvectors // 2 + totals["eigenvalues"]
    ratio = sd15_plan.factor_bytes / lean.factor_bytes
    assert ratio == pytest.approx((covariances + eigenvectors + totals["eigenvalues"]) / lean.factor_bytes)
    assert 3.3 < ratio < 3.6  # README: "about 3.5×"


def test_large_layer_approximation_keeps_k_activation_eigenvectors(sd15_plan: hfi.Plan) -> None:
    approx = sd15_plan.replace(max_factor_size=8192, large_layer_rank=1024)
    large = [layer for layer in approx.layers if layer.d_in > 8192]
    assert large and all(layer.activation_rank == 1024 for layer in large)
    expected = sum(4 * layer.d_in * (1024 if layer.d_in > 8192 else layer.d_in) for layer in sd15_plan.layers)
    assert approx.totals()["activation_eigenvectors"] == expected
    # EK-FAC keeps k corrected columns and one complement value per gradient direction.
    layer = large[0]
    assert layer.bytes["eigenvalues"] == 4 * (layer.d_out * 1024 + layer.d_out * (1 + layer.bias))


def lora_sd15(rank: int = 4) -> nn.Module:
    model = meta_model("sd15")
    with torch.device("meta"):
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return model


def test_lora_only_plan_is_a_sliver_of_the_full_unet(sd15_plan: hfi.Plan) -> None:
    model = lora_sd15()
    lora = hfi.plan(model, hfi.FactorConfig(module_filter=hfi.LORA_ONLY, batch_size=8))
    lora_modules = [m for name, m in model.named_modules() if name.endswith((".lora_A.default", ".lora_B.default"))]
    assert len(lora.layers) == len(lora_modules) == 2 * 4 * 32  # A and B of q, k, v, out in 32 attention blocks
    expected = sum(4 * (m.weight[0].numel() ** 2 + m.weight.shape[0] ** 2) for m in lora_modules)
    assert lora.totals()["activation_covariance"] + lora.totals()["gradient_covariance"] == expected
    # lora_A keeps the base layer's activation factor and lora_B its gradient factor: a few percent of the
    # factors remain, while an index entry (r (d_in + d_out) per adapted layer) is almost nothing.
    assert lora.factor_bytes < 0.03 * sd15_plan.factor_bytes
    assert lora.index_bytes_per_example < 0.001 * sd15_plan.index_bytes_per_example
    # The full plan of the adapted model offers the LoRA-only option, with the same bytes.
    full = hfi.plan(model, batch_size=8)
    options = dict(full.options())
    assert options["LoRA layers only (module_filter=hfi.LORA_ONLY)"].factor_bytes == lora.factor_bytes


def test_refusal_lists_options_that_fit(sd15_plan: hfi.Plan) -> None:
    sd15_plan.check_fits(200e9)  # no error
    with pytest.raises(MemoryError, match="These would fit") as error:
        sd15_plan.check_fits(60e9, storage_bytes=50e9)
    message = str(error.value)
    assert "LORA_ONLY" in message
    listed = [label for label, option in sd15_plan.options() if label in message]
    assert "large-layer approximation (max_factor_size=8192, large_layer_rank=1024)" in listed
    assert "drop covariances (keep_covariances=False)" in listed  # 35.7 GB stored, 55.4 GB to fit
    assert "bf16 eigenvectors (eigenvector_dtype='bfloat16')" not in listed  # 51.8 GB stored
    for label, option in sd15_plan.options():
        assert (label in message) == option.fits(60e9, 50e9)
    with pytest.raises(MemoryError, match="None of the options fits"):
        sd15_plan.check_fits(20e9)


@pytest.mark.parametrize(
    "index_config",
    [
        hfi.IndexConfig(),
        hfi.IndexConfig(quantize_bits=8),
        hfi.IndexConfig(compression="svd", rank=3),
        hfi.IndexConfig(compression="svd", rank=3, quantize_bits=8),
        hfi.IndexConfig(compression="projection", projection_dim=5),
    ],
)
def test_index_bytes_match_what_the_compressor_stores(index_config: hfi.IndexConfig) -> None:
    model = tiny_unet()
    result = hfi.plan(model, index_config=index_config)
    layers = dict(hfi.curvature.find_layers(model))
    shapes = {layer.name: (layer.d_out, layer.d_in) for layer in result.layers}
    compressor = make_compressor(index_config, shapes)
    projections = kronecker_projections(shapes, index_config.projection_dim, 0)
    for layer in result.layers:
        weight = torch.randn(1, layer.d_out, layer.d_in)
        bias = torch.randn(1, layer.d_out) if layers[layer.name].bias is not None else None
        if index_config.compression == "projection":  # the training side is projected inside the hooks
            project_out, project_in = projections[layer.name]
            weight = project_out.T @ weight @ project_in
            bias = None if bias is None else bias @ project_out
        stored = compressor.encode(layer.name, weight, bias)
        assert layer.bytes["index_per_example"] == sum(v.numel() * v.element_size() for v in stored.values())


def test_a_real_model_is_planned_with_its_own_layers_and_positions() -> None:
    model = tiny_unet()
    result = hfi.plan(model)
    assert [layer.name for layer in result.layers] == list(hfi.curvature.find_layers(model))
    assert next(model.parameters()).device.type == "cpu"  # the user's model is untouched
    positions = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            # Linear: tokens per example; Conv2d: output pixels.
            linear = isinstance(module, nn.Linear)
            positions[name] = output[0].numel() // output.shape[-1] if linear else output.shape[-1] * output.shape[-2]

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in hfi.curvature.find_layers(model).items()]
    model(torch.randn(1, 1, 8, 8), torch.tensor([3]))
    for handle in handles:
        handle.remove()
    assert {layer.name: layer.positions for layer in result.layers} == positions


def test_cli_plan_prints_json_and_refuses_with_options(capsys) -> None:
    main(["plan", "--preset", "sd15", "--json", "--batch-size", "8"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == 282 and summary["largest_activation_factor"] == 23040
    with pytest.raises(SystemExit, match="These would fit"):
        main(["plan", "--preset", "sd15", "--batch-size", "8", "--memory-gb", "45", "--max-factor-size", "4096"])
    main(["plan", "--preset", "sd15", "--batch-size", "8", "--memory-gb", "80", "--no-keep-covariances"])
    assert "Fits in 80 GB" in capsys.readouterr().out


@pytest.mark.parametrize("budget", [4096, 16384, 65536])
def test_an_index_budget_is_planned_as_the_eigenbasis_build_chooses_it(budget: int) -> None:
    """Under a byte budget (given factors, the build's choice) the planned entry fits it; the basis file the index
    keeps is Q_G, Q_A, the whitening scales and the bias scales of every layer in fp32, summed here from the
    model's own weights."""
    result = hfi.plan("sd15", index_config=hfi.IndexConfig(max_bytes_per_example=budget))
    assert result.index_config.compression == "eigenbasis"
    assert 0.9 * budget <= result.index_bytes_per_example - 8 <= budget  # its int64 id apart
    expected = sum(
        4 * (d_out * d_out + d_in * d_in + d_out * d_in + d_out * has_bias)
        for d_out, d_in, has_bias in weight_shapes(meta_model("sd15"))
    )
    assert result.summary()["eigenbasis_file_bytes"] == expected
    assert f"budget {budget} bytes" in str(result)
