"""Every pipeline kind end to end: tiny pipelines built from configs, saved, reloaded with
`DiffusionPipeline.from_pretrained`, then fitted and scored.

Exactness: per-example gradients against `torch.func.grad` of a per-draw loss rebuilt from the pipeline's own
components, independently of the task: the VAE's posterior sampled per draw, the scheduler's forward process
(`add_noise` / `scale_noise`), the text encoder run on the tokenized caption (or "" where the draw drops it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from safetensors.torch import load_file
from test_gradients import assert_gradients_close
from tiny_pipelines import (
    DIGIT_NAMES,
    KINDS,
    NUM_CLASSES,
    build_pipeline,
    digit_dataset,
    lora_pipeline,
    save_and_reload,
    saved_pipeline,
    tiny_class_unet,
    tiny_latent_unet,
)
from torch import nn
from torch.func import functional_call, grad

import hf_influence as hfi
from hf_influence.curvature.layers import find_layers
from hf_influence.engine import DrawPlan
from hf_influence.gradients import per_example_gradients
from hf_influence.noise_schedules import DDPMSchedule, FlowMatchingSchedule

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

COLUMNS = {
    "ldm_kl": {},
    "ldm_vq": {},
    "dit": {"label_column": "label"},
    "sd": {"caption_column": "text"},
    "sd3": {"caption_column": "text"},
}
DRAWS = 2


def query_conditions(kind: str, rows) -> dict:
    """What a query was generated from: its class (DiT) or prompt (text-to-image)."""
    if COLUMNS[kind].get("label_column"):
        return {"labels": rows["label"]}
    if COLUMNS[kind].get("caption_column"):
        return {"prompts": rows["text"]}
    return {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipelines")


@pytest.fixture(scope="module")
def pipelines(workdir):
    """Each kind's saved-and-reloaded pipeline, built once per module."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = saved_pipeline(kind, workdir)
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def train():
    return digit_dataset(4)


@pytest.fixture(scope="module")
def queries():
    return digit_dataset(2, offset=10)


def fit(task, train, **config):
    options = {"draws_per_example": DRAWS, "batch_size": 8, **config}
    return hfi.fit_factors(task, train, hfi.FactorConfig(**options))


def scores(task, factors, queries, train, **kwargs):
    return hfi.pairwise_scores(
        task, factors, queries["image"], train, draws_per_query=DRAWS, draws_per_example=DRAWS, batch_size=8, **kwargs
    )


# --------------------------------------------------------------------------- every kind, end to end


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_fits_and_scores(kind, pipelines, train, queries):
    pipeline = pipelines(kind)
    task = hfi.DiffusionTask.from_pipeline(pipeline, random_flip=True, **COLUMNS[kind])
    assert task.sample_shape == (2, 8, 8)  # the denoiser works on latents
    assert task.image_shape == (3, 16, 16)  # the VAE on RGB images
    assert task.prediction_type == ("flow_prediction" if kind == "sd3" else "epsilon")
    factors = fit(task, train)
    # the curvature covers the denoiser's layers only: never the frozen VAE or text encoders
    assert factors.modules == list(find_layers(task.denoiser))
    result = scores(task, factors, queries, train, **query_conditions(kind, queries))
    assert result.shape == (2, 4)
    assert torch.isfinite(result).all() and (result != 0).all()


def test_latent_draws_take_a_fresh_posterior_sample(pipelines, train):
    """AutoencoderKL: x0 = (μ + σ η − shift) · scale with η per draw; VQModel: one deterministic latent."""
    kl = hfi.DiffusionTask.from_pipeline(pipelines("ldm_kl"))
    examples = kl.examples(train["image"][:1])
    draws = kl.draw([0], 3, seed=0, stream="train")
    clean, _ = kl.noisy_inputs(examples, draws, repeats=3)
    posterior = pipelines("ldm_kl").vqvae.encode(kl.preprocess(train["image"][:1])).latent_dist
    expected = (posterior.mean + posterior.std * draws.latent_noise) * 0.5
    torch.testing.assert_close(clean, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(clean[0], clean[1])

    vq = hfi.DiffusionTask.from_pipeline(pipelines("ldm_vq"))
    draws = vq.draw([0], 3, seed=0, stream="train")
    assert draws.latent_noise is None
    clean, _ = vq.noisy_inputs(vq.examples(train["image"][:1]), draws, repeats=3)
    assert torch.equal(clean[0], clean[2])
    latents = pipelines("ldm_vq").vqvae.encode(vq.preprocess(train["image"][:1])).latents
    torch.testing.assert_close(clean[0], latents[0] * 0.5)


# --------------------------------------------------------------------------- exactness against torch.func


def reference_gradients(task, pipeline, kind: str, rows, layers: dict, num_draws: int, seed: int) -> dict:
    """Per example, the mean over its draws of `∇θ mean((pred − target)²)`, rebuilt from the pipeline's parts."""
    ids = rows["id"]
    draws = task.draw(ids, num_draws, seed, "train", augment=True)
    dtype = torch.float64
    pixels = task.preprocess(rows["image"]).to(dtype).repeat_interleave(num_draws, dim=0)
    pixels = torch.where(draws.flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    vae = pipeline.components.get("vae") or pipeline.components["vqvae"]
    with torch.no_grad():
        if isinstance(vae, AutoencoderKL):
            posterior = vae.encode(pixels).latent_dist  # one encoding per draw
            latents = posterior.mean + posterior.std * draws.latent_noise.to(dtype)
        else:
            latents = vae.encode(pixels).latents
    x0 = (latents - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor
    noise = draws.noise.to(dtype)
    if kind == "sd3":
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
        timesteps = scheduler.timesteps[draws.timesteps]
        noisy, target = scheduler.scale_noise(x0, timesteps, noise), noise - x0
    else:
        timesteps = draws.timesteps
        noisy, target = pipeline.scheduler.add_noise(x0, noise, timesteps), noise

    dropped = draws.drop if draws.drop is not None else torch.zeros(len(draws), dtype=torch.bool)
    if kind == "dit":
        labels = torch.tensor(rows["label"]).repeat_interleave(num_draws)
        inputs = {"class_labels": torch.where(dropped, NUM_CLASSES, labels)}
    elif kind in ("sd", "sd3", "sd_lora"):
        captions = [caption for caption in rows["text"] for _ in range(num_draws)]
        captions = ["" if drop else caption for caption, drop in zip(captions, dropped.tolist(), strict=True)]
        with torch.no_grad():
            if kind == "sd3":
                states, _, pooled, _ = pipeline.encode_prompt(
                    prompt=captions, prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False
                )
                inputs = {"encoder_hidden_states": states, "pooled_projections": pooled}
            else:
                tokens = pipeline.tokenizer(
                    captions, padding="max_length", max_length=pipeline.tokenizer.model_max_length, truncation=True
                )
                states = pipeline.text_encoder(torch.tensor(tokens.input_ids))[0]
                inputs = {"encoder_hidden_states": states}
    else:
        inputs = {}

    denoiser = task.denoiser
    channels = task.sample_shape[0]
    params = {name: value.detach() for name, value in denoiser.named_parameters()}

    def loss(p: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, extra: dict) -> torch.Tensor:
        kwargs = {"timestep": t[None], **{name: value[None] for name, value in extra.items()}}
        prediction = functional_call(denoiser, p, (x[None],), kwargs).sample[:, :channels]
        return (prediction - y[None]).pow(2).mean()

    rows_grads = [
        grad(loss)(params, noisy[s], timesteps[s], target[s], {name: value[s] for name, value in inputs.items()})
        for s in range(len(draws))
    ]
    result = {}
    for name, module in layers.items():
        weight = torch.stack([g[f"{name}.weight"] for g in rows_grads])
        weight = weight.reshape(len(ids), num_draws, module.weight.shape[0], -1).mean(dim=1)
        bias = None
        if module.bias is not None:
            bias = torch.stack([g[f"{name}.bias"] for g in rows_grads]).reshape(len(ids), num_draws, -1).mean(dim=1)
        result[name] = (weight, bias)
    return result, draws


@pytest.mark.parametrize("kind", ["ldm_kl", "ldm_vq", "dit", "sd", "sd3", "sd_lora"])
def test_per_example_gradients_match_torch_func(kind, workdir, train):
    """Latent (KL and VQ), class-conditional, text-conditional, flow-matching and LoRA-adapted, in fp64, with flips and
    (for the conditional kinds) classifier-free-guidance dropout of half the draws."""
    if kind == "sd_lora":
        pipeline, _ = lora_pipeline(workdir / "exact-lora")
        columns, module_filter = COLUMNS["sd"], hfi.LORA_ONLY
    else:
        pipeline = save_and_reload(build_pipeline(kind, workdir / "exact"), workdir / "exact" / kind)
        columns, module_filter = COLUMNS[kind], None
    pipeline.to(torch.float64)
    dropout = 0.5 if columns else 0.0
    task = hfi.DiffusionTask.from_pipeline(pipeline, random_flip=True, condition_dropout=dropout, **columns)
    layers = find_layers(task.denoiser, module_filter)
    rows = train.select(range(2))
    num_draws, seed = 3, 4
    expected, draws = reference_gradients(task, pipeline, kind, rows, layers, num_draws, seed)
    assert draws.flip.any() and not draws.flip.all()
    if dropout:
        assert draws.drop.any() and not draws.drop.all()
    examples = task.examples_from_rows(list(rows))
    plan = DrawPlan(hfi.Loss(), num_draws, seed, "train", batch_size=2, augment=True)  # draws split over passes
    actual = per_example_gradients(task, layers, examples, rows["id"], plan, dtype=torch.float64)
    assert_gradients_close(actual, expected)


# --------------------------------------------------------------------------- conditioning matters


def test_a_query_class_changes_its_scores_only(pipelines, train, queries):
    task = hfi.DiffusionTask.from_pipeline(pipelines("dit"), label_column="label")
    factors = fit(task, train)
    labels = queries["label"]
    other = (labels[1] + 1) % NUM_CLASSES
    original = scores(task, factors, queries, train, labels=labels)
    # class names go through the pipeline's id2label, as DiTPipeline.get_label_ids does
    by_name = scores(task, factors, queries, train, labels=[DIGIT_NAMES[labels[0]], DIGIT_NAMES[other]])
    changed = scores(task, factors, queries, train, labels=[labels[0], other])
    torch.testing.assert_close(by_name, changed, rtol=0, atol=0)
    torch.testing.assert_close(changed[0], original[0], rtol=1e-6, atol=1e-6 * original.abs().max().item())
    assert (changed[1] - original[1]).abs().max() > 1e-3 * original[1].abs().max()
    with pytest.raises(ValueError, match="Unknown class name 'ten'"):
        scores(task, factors, queries, train, labels=["ten", "one"])
    with pytest.raises(ValueError, match="conditioned on labels: pass labels="):
        scores(task, factors, queries, train)


def test_a_training_caption_changes_its_scores_only(pipelines, train, queries):
    task = hfi.DiffusionTask.from_pipeline(pipelines("sd"), caption_column="text")
    factors = fit(task, train)
    prompts = queries["text"]
    original = scores(task, factors, queries, train, prompts=prompts)
    recaptioned = train.map(lambda row: {"text": "a blank page" if row["id"] == 2 else row["text"]})
    changed = scores(task, factors, queries, recaptioned, prompts=prompts)
    kept = [0, 1, 3]
    scale = original.abs().max().item()
    torch.testing.assert_close(changed[:, kept], original[:, kept], rtol=1e-6, atol=1e-6 * scale)
    assert (changed[:, 2] - original[:, 2]).abs().max() > 1e-3 * original[:, 2].abs().max()
    # and the query's prompt matters too
    reprompted = scores(task, factors, queries, train, prompts=[prompts[0], "a blank page"])
    assert (reprompted[1] - original[1]).abs().max() > 1e-3 * original[1].abs().max()
    with pytest.raises(ValueError, match="labels= was given, but this pipeline is conditioned on prompts"):
        scores(task, factors, queries, train, labels=[0, 1])
    with pytest.raises(KeyError, match="no column 'text'"):
        hfi.fit_factors(task, train.remove_columns("text"))


def test_class_conditional_pixel_unet(train, queries, tmp_path):
    torch.manual_seed(0)
    pipeline = save_and_reload(DDPMPipeline(unet=tiny_class_unet(), scheduler=DDPMScheduler()), tmp_path / "ddpm")
    task = hfi.DiffusionTask.from_pipeline(pipeline, label_column="label")
    assert task.image_shape == task.sample_shape == (1, 16, 16)
    factors = fit(task, train)
    original = scores(task, factors, queries, train, labels=queries["label"])
    changed = scores(task, factors, queries, train, labels=[queries["label"][0], (queries["label"][1] + 1) % 10])
    assert torch.isfinite(original).all()
    torch.testing.assert_close(changed[0], original[0], rtol=1e-6, atol=1e-6 * original.abs().max().item())
    assert (changed[1] - original[1]).abs().max() > 1e-3 * original[1].abs().max()
    with pytest.raises(ValueError, match="needs a null class"):
        hfi.DiffusionTask.from_pipeline(pipeline, label_column="label", condition_dropout=0.1)
    with pytest.raises(ValueError, match=r"class-conditional .*pass label_column"):
        hfi.DiffusionTask.from_pipeline(pipeline)


# --------------------------------------------------------------------------- the index path


def test_index_and_attributor_with_prompts(pipelines, train, queries, tmp_path):
    """Flow matching, text conditioning and CFG dropout through build_index and Attributor.attribute:
    the uncompressed index gives the streamed pairwise scores."""
    task = hfi.DiffusionTask.from_pipeline(
        pipelines("sd3"), caption_column="text", random_flip=True, condition_dropout=0.2
    )
    factors = fit(task, train)
    prompts = queries["text"]
    exact = scores(task, factors, queries, train, prompts=prompts)
    index = hfi.build_index(task, train, hfi.IndexConfig(draws_per_example=DRAWS, batch_size=8), output_dir=tmp_path)
    attributor = hfi.Attributor(task, factors, index)
    result = attributor.attribute(queries["image"], prompts=prompts, draws_per_query=DRAWS, top_k=2)
    torch.testing.assert_close(result.scores, exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
    assert result.ids.tolist() == train["id"]
    other = attributor.attribute(queries["image"], prompts=[prompts[0], "a blank page"], draws_per_query=DRAWS)
    assert not torch.allclose(other.scores[1], result.scores[1])  # the query-gradient cache knows the prompts
    with pytest.raises(ValueError, match="conditioned on prompts"):
        attributor.attribute(queries["image"], draws_per_query=DRAWS)


def test_conditional_latent_factors_do_not_depend_on_the_batch_size(pipelines, train):
    """Every random choice — timestep, noise, flip, posterior sample, caption dropout, probe — is seeded by the
    example's id, and captions and latents are encoded per example: the covariances are the same in any batching
    (eigenvectors are not compared: with 8 draws the factors are singular, so their null-space bases are arbitrary)."""
    task = hfi.DiffusionTask.from_pipeline(
        pipelines("sd3"), caption_column="text", random_flip=True, condition_dropout=0.5
    )
    whole = fit(task, train, batch_size=8, strategy="kfac")
    pieces = fit(task, train, batch_size=2, strategy="kfac")
    covariances = [name for name in whole.tensors if name.endswith("_covariance")]
    assert len(covariances) == 2 * len(whole.modules)
    for name in covariances:
        value = whole.tensors[name]
        torch.testing.assert_close(pieces.tensors[name], value, rtol=1e-5, atol=1e-6 * value.abs().max().item())


# --------------------------------------------------------------------------- LoRA


def test_lora_attributes_only_the_adapter(workdir, train, queries):
    pipeline, lora_dir = lora_pipeline(workdir / "lora")
    task = hfi.DiffusionTask.from_pipeline(pipeline, caption_column="text")
    factors = fit(task, train, module_filter=hfi.LORA_ONLY)
    lora_layers = {
        name
        for name, module in task.denoiser.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and (".lora_A." in name or ".lora_B." in name)
    }
    assert lora_layers and set(factors.modules) == lora_layers
    # as many parameters as PEFT holds for the adapter and the shipped weights file has (LoRA layers have no bias)
    from peft.utils import get_peft_model_state_dict

    attributed = sum(math.prod(shape) for shape in factors.metadata.shapes.values())
    peft_count = sum(
        value.numel() for value in get_peft_model_state_dict(task.denoiser, adapter_name="default_0").values()
    )
    shipped = sum(value.numel() for value in load_file(lora_dir / "pytorch_lora_weights.safetensors").values())
    assert attributed == peft_count == shipped
    assert all(find_layers(task.denoiser)[name].bias is None for name in factors.modules)
    # the adapter's weights are part of the model's identity
    base = hfi.DiffusionTask.from_pipeline(saved_pipeline("sd", workdir / "lora-base"), caption_column="text")
    assert base.fingerprint() != task.fingerprint()
    result = scores(task, factors, queries, train, prompts=queries["text"])
    assert torch.isfinite(result).all() and (result != 0).all()


# --------------------------------------------------------------------------- flow-matching schedule


def test_flow_matching_schedule_is_diffusers_forward_process():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)  # a pipeline that has generated: its own timesteps are the inference ones now
    schedule = FlowMatchingSchedule(scheduler)
    fresh = FlowMatchEulerDiscreteScheduler(shift=3.0)
    index = torch.tensor([0, 1, 500, 998, 999])
    clean, noise = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    torch.testing.assert_close(schedule.model_timesteps(index), fresh.timesteps[index])
    torch.testing.assert_close(
        schedule.noisy(clean.double(), noise.double(), index).float(),
        fresh.scale_noise(clean, fresh.timesteps[index], noise),
    )
    torch.testing.assert_close(schedule.target(clean, noise, index), noise - clean)


def test_flow_matching_elbo_weights_are_those_of_the_equivalent_vp_process():
    """The closed form against DDPM's weights on the VP process `x_σ / √((1 − σ)² + σ²)`, whose betas are the
    ratios of consecutive ᾱ (least noise first, as DDPM orders them) and whose ᾱ are their cumulative product."""
    schedule = FlowMatchingSchedule(FlowMatchEulerDiscreteScheduler(num_train_timesteps=50, shift=3.0))
    sigma = schedule.sigmas.flip(0)  # least noise first
    alpha_bar = (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma**2)
    betas = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    vp = DDPMScheduler(num_train_timesteps=50, trained_betas=betas.numpy())  # diffusers computes the ᾱ (fp32)
    ddpm = DDPMSchedule(vp).simplified_elbo_weights().flip(0)  # back to the flow's order (most noise first)
    weights = schedule.simplified_elbo_weights()
    epsilon_factor = schedule.epsilon_mse_factor(torch.arange(50))
    # index 0 is σ = 1, where ε-space error vanishes and DDPM's weight is infinite: the product is finite
    assert torch.isfinite(weights).all() and (weights > 0).all()
    torch.testing.assert_close(weights[1:], ddpm[1:] * epsilon_factor[1:], rtol=1e-5, atol=0)


def test_simplified_elbo_measurement_on_a_flow_pipeline(pipelines, queries):
    task = hfi.DiffusionTask.from_pipeline(pipelines("sd3"), caption_column="text")
    examples = task.examples(queries["image"], prompts=queries["text"])
    output, draws = task.run(examples, [0, 1], 3, slice(0, 3), seed=0, stream="query")
    weights = task.schedule.simplified_elbo_weights()[draws.timesteps].float()
    torch.testing.assert_close(hfi.SimplifiedELBO()(task, output), weights * output.loss_per_draw())
    torch.testing.assert_close(hfi.Loss()(task, output), (output.prediction - output.target).pow(2).mean((1, 2, 3)))


# --------------------------------------------------------------------------- clear errors


def test_unsupported_components_are_named(pipelines, workdir):
    from diffusers import AutoencoderTiny, ScoreSdeVeScheduler, UNet1DModel, UNet2DConditionModel

    with pytest.raises(TypeError, match=r"'scheduler' component \(ScoreSdeVeScheduler\) is not a supported"):
        hfi.DiffusionTask.from_pipeline(DDPMPipeline(unet=tiny_latent_unet(), scheduler=ScoreSdeVeScheduler()))
    audio = DDPMPipeline(unet=UNet1DModel(block_out_channels=(8, 8, 8)), scheduler=pipelines("sd").scheduler)
    with pytest.raises(TypeError, match=r"'unet' component \(UNet1DModel\) is not a supported denoiser"):
        hfi.DiffusionTask.from_pipeline(audio)
    sd = pipelines("sd")
    tiny_vae = AutoencoderTiny(
        encoder_block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        num_encoder_blocks=(1,),
        num_decoder_blocks=(1,),
        latent_channels=2,
    )
    with pytest.raises(TypeError, match=r"'vae' component \(AutoencoderTiny\) is not a supported VAE"):
        hfi.DiffusionTask.from_pipeline(StableDiffusionPipeline(**{**sd.components, "vae": tiny_vae}))
    sdxl_like = UNet2DConditionModel(
        **{
            **sd.unet.config,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 40,
        }
    )
    with pytest.raises(TypeError, match=r"'unet' component .*addition_embed_type='text_time'"):
        hfi.DiffusionTask.from_pipeline(StableDiffusionPipeline(**{**sd.components, "unet": sdxl_like}))
    with pytest.raises(ValueError, match=r"text-conditional .* pass caption_column"):
        hfi.DiffusionTask.from_pipeline(sd)
    with pytest.raises(ValueError, match=r"class-conditional .* pass label_column"):
        hfi.DiffusionTask.from_pipeline(pipelines("dit"))
    with pytest.raises(ValueError, match="takes no text"):
        hfi.DiffusionTask.from_pipeline(pipelines("dit"), caption_column="text")
    task = hfi.DiffusionTask.from_pipeline(pipelines("ldm_kl"))
    with pytest.raises(ValueError, match=r"the VAE expects \(3, 16, 16\)"):
        task.preprocess(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"task\.examples"):
        task.predict(torch.zeros(1, 3, 16, 16), task.draw([0], 1, 0, "query"), repeats=1)


def test_cli_attributes_generated_images_of_a_class_conditional_pipeline(workdir, tmp_path, capsys):
    from hf_influence.cli import main

    saved_pipeline("dit", workdir)
    digit_dataset(8).save_to_disk(str(tmp_path / "digits"))
    common = ["--pipeline", str(workdir / "dit"), "--dataset", str(tmp_path / "digits"), "--label-column", "label"]
    main(["fit-factors", *common, "--output-dir", str(tmp_path / "factors"), "--batch-size", "8"])
    main(["build-index", *common, "--output-dir", str(tmp_path / "index"), "--num-draws", "2"])
    # guidance 1: DiTPipeline's null class for guidance is 1000, past the tiny DiT's 10 classes
    options = ["--generate", "2", "--num-inference-steps", "2", "--top-k", "3", "--guidance-scale", "1"]
    stored = ["--factors", str(tmp_path / "factors"), "--index", str(tmp_path / "index")]
    attribute = ["attribute", *common, *stored, *options]
    with pytest.raises(SystemExit) as refused:  # a usage error: one line naming the option, exit status 2
        main([*attribute, "--output-dir", str(tmp_path / "none")])
    message = capsys.readouterr().err
    assert refused.value.code == 2 and "error: This pipeline is class-conditional" in message and "--label" in message
    main([*attribute, "--label", "3", "7", "--output-dir", str(tmp_path / "a")])
    queries = json.loads((tmp_path / "a" / "attribution.json").read_text())["queries"]
    assert len(queries) == 2 and all(len(query["proponents"]["ids"]) == 3 for query in queries)
    main([*attribute, "--label", "4", "7", "--output-dir", str(tmp_path / "b")])
    changed = json.loads((tmp_path / "b" / "attribution.json").read_text())["queries"]
    assert changed[1] == queries[1] and changed[0]["proponents"]["scores"] != queries[0]["proponents"]["scores"]
