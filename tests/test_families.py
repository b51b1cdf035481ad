"""The popular text-to-image families — SDXL, Flux.1, SD3 with T5, PixArt-α/Σ, Sana — full denoiser and LoRA.

Each is built tiny from configs (text encoders and tokenizers built in code), saved and reloaded with
`DiffusionPipeline.from_pretrained`. Exactness: per-example gradients against `torch.func.grad` of a per-draw loss
rebuilt from the pipeline's own public parts — its `encode_prompt`, its VAE, the forward process written out, its
latent packing (`FluxPipeline._pack_latents`) — independently of the library's recording of the pipeline's call.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from peft import LoraConfig
from test_gradients import assert_gradients_close
from tiny_pipelines import FAMILY_KINDS, IMAGE_SIDES, IMAGE_SIZE, build_pipeline, digit_dataset, save_and_reload
from torch.func import functional_call, grad

import hf_influence as hfi
from hf_influence.curvature.layers import find_layers
from hf_influence.engine import DrawPlan
from hf_influence.gradients import per_example_gradients

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

FAMILIES = {"sd3_t5": "sd3", "sdxl": "sdxl", "flux": "flux", "pixart_alpha": "diffusers", "pixart_sigma": "diffusers",
            "sana": "diffusers"}  # fmt: skip
FLOW = ("sd3_t5", "flux", "sana")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def side(kind: str) -> int:
    return IMAGE_SIDES.get(kind, IMAGE_SIZE)


def loaded(kind: str, workdir: Path, dtype: torch.dtype = torch.float32):
    pipeline = save_and_reload(build_pipeline(kind, workdir / "build"), workdir / kind)
    return pipeline.to(dtype)


def task_of(pipeline, kind: str, **options) -> hfi.DiffusionTask:
    return hfi.DiffusionTask.from_pipeline(pipeline, caption_column="text", resolution=side(kind), **options)


# --------------------------------------------------------------------------- the reference, written out


def reference_inputs(pipeline, kind: str, captions: list[str]) -> dict:
    """The denoiser's text inputs from the pipeline's own `encode_prompt`, as its `__call__` would pass them."""
    device = "cpu"
    with torch.no_grad():
        if kind == "sdxl":
            states, _, pooled, _ = pipeline.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
            time_ids = torch.tensor([[side(kind), side(kind), 0, 0, side(kind), side(kind)]] * len(captions))
            return {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        if kind == "sd3_t5":
            states, _, pooled, _ = pipeline.encode_prompt(
                captions, None, None, device=device, do_classifier_free_guidance=False
            )
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
        if kind == "flux":
            states, pooled, text_ids = pipeline.encode_prompt(captions, None, device=device)
            latent = side(kind) // pipeline.vae_scale_factor
            image_ids = pipeline._prepare_latent_image_ids(1, latent // 2, latent // 2, device, states.dtype)
            guidance = torch.full((len(captions),), 3.5, dtype=states.dtype)  # FluxPipeline's default
            return {"encoder_hidden_states": states, "pooled_projections": pooled, "guidance": guidance,
                    "txt_ids": text_ids, "img_ids": image_ids}  # fmt: skip
        default_instruction = inspect.signature(pipeline.__call__).parameters.get("complex_human_instruction")
        options = {"complex_human_instruction": default_instruction.default} if default_instruction else {}
        states, mask, _, _ = pipeline.encode_prompt(
            captions, do_classifier_free_guidance=False, device=device, clean_caption=False, **options
        )
        extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}} if "pixart" in kind else {}
        return {"encoder_hidden_states": states, "encoder_attention_mask": mask, **extra}


def forward_process(pipeline, kind: str, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor):
    """(x_t, the denoiser's timestep, the target) written out from the scheduler's configuration."""
    if kind in FLOW:
        shift = pipeline.scheduler.config.get("flow_shift") if kind == "sana" else None
        scheduler = (
            FlowMatchEulerDiscreteScheduler(shift=shift)
            if shift
            else FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        )
        sigma = scheduler.sigmas[index].to(x0.dtype).view(-1, 1, 1, 1)
        timestep = scheduler.timesteps[index].to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise, timestep / 1000 if kind == "flux" else timestep, noise - x0
    training = DDPMScheduler.from_config(pipeline.scheduler.config)  # what SDXL and PixArt are trained with
    return training.add_noise(x0, noise, index), index, noise


def reference_gradients(task, pipeline, kind: str, rows, layers: dict, num_draws: int, seed: int) -> dict:
    """Per example, the mean over its draws of `∇θ mean((pred − target)²)`, rebuilt from the pipeline's parts."""
    draws = task.draw(rows["id"], num_draws, seed, "train", augment=True)
    dtype = torch.float64
    pixels = task.preprocess(rows["image"]).to(dtype).repeat_interleave(num_draws, dim=0)
    vae = pipeline.vae
    with torch.no_grad():
        if isinstance(vae, AutoencoderKL):
            posterior = vae.encode(pixels).latent_dist
            latents = posterior.mean + posterior.std * draws.latent_noise.to(dtype)
        else:  # Sana's AutoencoderDC
            latents = vae.encode(pixels).latent
    x0 = (latents - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
    noisy, timesteps, target = forward_process(pipeline, kind, x0, draws.noise.to(dtype), draws.timesteps)
    captions = [caption for caption in rows["text"] for _ in range(num_draws)]
    inputs = reference_inputs(pipeline, kind, captions)
    denoiser, (channels, height, width) = task.denoiser, task.sample_shape
    params = {name: value.detach() for name, value in denoiser.named_parameters()}

    def per_draw(value, s: int):
        if isinstance(value, dict):
            return {key: per_draw(inner, s) for key, inner in value.items()}
        batched = isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == len(captions)
        return value[s : s + 1] if batched else value

    def loss(p: dict, s: int) -> torch.Tensor:
        x = noisy[s : s + 1]
        if kind == "flux":
            x = pipeline._pack_latents(x, 1, channels, height, width)
        output = functional_call(denoiser, p, (x,), {"timestep": timesteps[s : s + 1], **per_draw(inputs, s)})
        prediction = output.sample
        if kind == "flux":
            prediction = pipeline._unpack_latents(prediction, side(kind), side(kind), pipeline.vae_scale_factor)
        return (prediction[:, :channels] - target[s : s + 1]).pow(2).mean()

    per_draw_grads = [grad(loss)(params, s) for s in range(len(draws))]
    result = {}
    for name, module in layers.items():
        weight = torch.stack([g[f"{name}.weight"] for g in per_draw_grads])
        weight = weight.reshape(len(rows), num_draws, module.weight.shape[0], -1).mean(dim=1)
        bias = None
        if module.bias is not None:
            bias = torch.stack([g[f"{name}.bias"] for g in per_draw_grads]).reshape(len(rows), num_draws, -1)
            bias = bias.mean(dim=1)
        result[name] = (weight, bias)
    return result


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("kind", sorted(FAMILY_KINDS))
def test_per_example_gradients_match_torch_func(kind, workdir):
    pipeline = loaded(kind, workdir / "exact", torch.float64)
    task = task_of(pipeline, kind)
    assert task.family.name == FAMILIES[kind]
    layers = find_layers(task.denoiser)
    rows = digit_dataset(2, size=side(kind))
    expected = reference_gradients(task, pipeline, kind, rows, layers, num_draws=3, seed=4)
    plan = DrawPlan(hfi.Loss(), 3, 4, "train", batch_size=2, augment=True)  # draws split over passes
    actual = per_example_gradients(task, layers, task.examples_from_rows(list(rows)), rows["id"], plan, torch.float64)
    # Sana's normalisations compute in fp32 even in an fp64 model: its agreement is fp32's.
    assert_gradients_close(actual, expected, rtol=1e-5 if kind == "sana" else 1e-8)


@pytest.mark.parametrize("kind", sorted(FAMILY_KINDS))
def test_factors_do_not_depend_on_the_batch_size(kind, workdir):
    """Covariances and K-FAC's eigenvalues with one draw per pass equal those with every draw in one pass (the
    eigenvectors of the near-zero eigenvalues of so few draws are arbitrary: they are not compared)."""
    task = task_of(loaded(kind, workdir / "batch", torch.float64), kind)
    rows = digit_dataset(3, size=side(kind))
    config = {"strategy": "kfac", "draws_per_example": 2, "dtype": "float64"}
    one, many = (hfi.fit_factors(task, rows, hfi.FactorConfig(**config, batch_size=size)) for size in (1, 6))
    tolerance = 1e-5 if kind == "sana" else 1e-9  # Sana's fp32 normalisations
    for name, value in one.tensors.items():
        if name.endswith(("covariance", "activation_eigenvalues", "gradient_eigenvalues")):
            torch.testing.assert_close(many.tensors[name], value, rtol=tolerance, atol=tolerance * value.abs().max())


@pytest.mark.parametrize("kind", sorted(FAMILY_KINDS))
def test_a_training_example_as_the_query_ranks_itself_first(kind, workdir):
    """The same image with the same caption: its own training gradient is the most influential for most."""
    task = task_of(loaded(kind, workdir / "self"), kind)
    train = digit_dataset(8, size=side(kind))
    factors = hfi.fit_factors(task, train, hfi.FactorConfig(draws_per_example=4, batch_size=16))
    scores = hfi.pairwise_scores(
        task, factors, train["image"], train, prompts=train["text"], draws_per_query=32, draws_per_example=32
    )
    assert (scores.argmax(dim=1) == torch.arange(8)).sum() >= 5


def test_families_train_as_they_were_trained(workdir):
    """Timestep densities: SD3 logit-normal, Flux the pipeline's dynamic shift at this resolution, the rest
    uniform; a loss weighting scales the training loss and the curvature, not the ELBO."""
    sd3 = task_of(loaded("sd3_t5", workdir / "density"), "sd3_t5")
    drawn = sd3.draw(list(range(200)), 4, 0, "fit").timesteps.double()
    assert sd3.timestep_density.name == "logit_normal" and abs(drawn.mean() - 500) < 60 and drawn.std() < 240
    flux = loaded("flux", workdir / "density")
    config = flux.scheduler.config
    tokens = (side("flux") // flux.vae_scale_factor // 2) ** 2
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
    task = task_of(flux, "flux")
    assert task.timestep_density.name == "shifted" and task.timestep_density.shift == pytest.approx(torch.e**mu)
    uniform = task_of(flux, "flux", timestep_density="uniform")
    sigma = lambda t: t.schedule.sigmas[t.draw(list(range(100)), 8, 0, "fit").timesteps].mean()  # noqa: E731
    assert sigma(task) > sigma(uniform) + 0.05  # shifted towards noise, as Flux samples
    weighted = task_of(flux, "flux", loss_weighting="cosmap")
    rows = digit_dataset(2, size=side("flux"))
    examples = weighted.examples_from_rows(list(rows))
    draws = weighted.draw(rows["id"], 3, 0, "fit")
    with torch.no_grad():
        output = weighted.predict(examples, draws, repeats=3)
    sigmas = weighted.schedule.sigmas[draws.timesteps]
    expected = 2 / (torch.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    torch.testing.assert_close(output.loss_per_draw(), expected.float() * output.mse_per_draw())
    torch.testing.assert_close(hfi.SimplifiedELBO()(weighted, output) / output.mse_per_draw(),
                               weighted.schedule.simplified_elbo_weights()[draws.timesteps].float())  # fmt: skip


def test_sdxl_time_ids_come_from_the_dataset_when_it_has_them(workdir):
    pipeline = loaded("sdxl", workdir / "time-ids")
    rows = digit_dataset(2).add_column("original_size", [[64, 48], [32, 32]]).add_column("crop", [[4, 2], [0, 0]])
    task = task_of(
        pipeline, "sdxl", conditioning_options={"original_size_column": "original_size", "crop_column": "crop"}
    )
    assert task.columns == ["image", "text", "original_size", "crop"]
    time_ids = task.examples_from_rows(list(rows)).conditioning["added_cond_kwargs/time_ids"]
    torch.testing.assert_close(time_ids, torch.tensor([[64.0, 48, 4, 2, 16, 16], [32, 32, 0, 0, 16, 16]]))
    default = task_of(pipeline, "sdxl").examples_from_rows(list(rows)).conditioning["added_cond_kwargs/time_ids"]
    torch.testing.assert_close(default, torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2))
    dropout = task_of(pipeline, "sdxl", condition_dropout=0.5)
    null = dropout.conditioning.null()  # force_zeros_for_empty_prompt: zeros, and each row keeps its time ids
    assert set(null) == {"encoder_hidden_states", "added_cond_kwargs/text_embeds"}
    assert all((value == 0).all() for value in null.values())
    with pytest.raises(ValueError, match=r"takes no conditioning options \['guidance_scale'\]"):
        task_of(pipeline, "sdxl", conditioning_options={"guidance_scale": 2.0})


@pytest.mark.parametrize("kind", ["sdxl", "flux", "sd3_t5", "pixart_sigma", "sana"])
def test_lora_only_attribution_covers_exactly_the_adapter(kind, workdir):
    pipeline = loaded(kind, workdir / "lora")
    denoiser = pipeline.unet if kind == "sdxl" else pipeline.transformer
    targets = ["to_q", "to_k", "to_v"]
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    else:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=2, target_modules=targets, init_lora_weights=False), denoiser)
    task = task_of(pipeline, kind)
    rows = digit_dataset(3, size=side(kind))
    factors = hfi.fit_factors(task, rows, hfi.FactorConfig(module_filter=hfi.LORA_ONLY, batch_size=8))
    lora = sorted(name.rsplit(".", 1)[0] for name, _ in denoiser.named_parameters() if ".lora_" in name)
    assert sorted(factors.modules) == sorted(set(lora))
    scores = hfi.pairwise_scores(task, factors, rows["image"], rows, prompts=rows["text"], draws_per_query=2,
                                 draws_per_example=2)  # fmt: skip
    assert torch.isfinite(scores).all() and (scores != 0).any()


def test_the_callers_pipeline_is_left_as_it_was(workdir):
    pipeline = loaded("flux", workdir / "untouched")
    scheduler, timesteps = pipeline.scheduler, pipeline.scheduler.timesteps.clone()
    task = task_of(pipeline, "flux")
    task.examples_from_rows(list(digit_dataset(2)))
    assert pipeline.scheduler is scheduler and torch.equal(pipeline.scheduler.timesteps, timesteps)


def test_unsupported_text_pipelines_are_named(workdir):
    from diffusers import DiffusionPipeline

    class UnknownTextPipeline(DiffusionPipeline):
        def __init__(self, unet, scheduler, vae, text_encoder, tokenizer) -> None:
            super().__init__()
            self.register_modules(
                unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
            )

    sd = build_pipeline("sd", workdir / "unknown")
    parts = {name: sd.components[name] for name in ("unet", "scheduler", "vae", "text_encoder", "tokenizer")}
    with pytest.raises(TypeError, match=r"UnknownTextPipeline .*needs a family in hf_influence/families"):
        hfi.DiffusionTask.from_pipeline(UnknownTextPipeline(**parts), caption_column="text")
