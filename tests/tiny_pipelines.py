"""Tiny diffusers pipelines of every kind `DiffusionTask` supports, built from configs with random weights.

Nothing is downloaded: the CLIP tokenizer's vocab.json and merges.txt are written here (single letters, no
merges: every word is spelled out). Each pipeline is saved and reloaded with `DiffusionPipeline.from_pretrained`,
as users load Hub pipelines; LoRA weights are saved with `save_lora_weights` and loaded with `load_lora_weights`,
the way fine-tunes are shipped. Images are 16×16, latents 2×8×8.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import datasets
import torch
from conftest import TINY_UNET_LAYOUT
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LDMPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import Unigram
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from hf_influence.data import mnist_demo_dataset

IMAGE_SIZE = 16
LATENT_SIZE = 8
LATENT_CHANNELS = 2
TEXT_LENGTH = 16  # the tokenizer's model_max_length
TEXT_WIDTH = 16
NUM_CLASSES = 10
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# What each kind is: the pipeline class, and the columns its task reads.
KINDS = {
    "ldm_kl": "LDMPipeline: UNet2DModel on AutoencoderKL latents (the paper's ArtBench setting), DDIM scheduler",
    "ldm_vq": "LDMPipeline: UNet2DModel on VQModel latents",
    "dit": "DiTPipeline: class-conditional DiTTransformer2DModel on AutoencoderKL latents",
    "sd": "StableDiffusionPipeline: UNet2DConditionModel, CLIP text encoder, AutoencoderKL",
    "sd3": "StableDiffusion3Pipeline: SD3Transformer2DModel, two CLIP encoders (no T5), flow matching",
}
# The text-to-image families of `hf_influence.families` beyond SD and SD3 without T5.
FAMILY_KINDS = {
    "sd3_t5": "StableDiffusion3Pipeline with its T5 encoder",
    "sdxl": "StableDiffusionXLPipeline: UNet2DConditionModel with text_time added conditions, two CLIP encoders",
    "flux": "FluxPipeline: FluxTransformer2DModel (guidance embedding), CLIP + T5, packed latents, dynamic shift",
    "pixart_alpha": "PixArtAlphaPipeline: PixArtTransformer2DModel (learned sigma), T5",
    "pixart_sigma": "PixArtSigmaPipeline: PixArtTransformer2DModel (learned sigma), T5",
    "sana": "SanaPipeline: SanaTransformer2DModel, Gemma 2, AutoencoderDC, DPM-Solver on flow sigmas",
}
# The image side of each kind's training images (Sana's pipeline wants a multiple of 32).
IMAGE_SIDES = {"sana": 32}


def _vae_blocks() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (8, 16),
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "sample_size": IMAGE_SIZE,
    }


def tiny_vae(**config: Any) -> AutoencoderKL:
    return AutoencoderKL(**_vae_blocks(), **config)


def tiny_vq() -> VQModel:
    return VQModel(**_vae_blocks(), num_vq_embeddings=16, vq_embed_dim=LATENT_CHANNELS, scaling_factor=0.5)


def tiny_latent_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, **TINY_UNET_LAYOUT
    )


def tiny_class_unet() -> UNet2DModel:
    """A pixel-space class-conditional UNet (`num_class_embeds`) on 16×16 grey images."""
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=NUM_CLASSES,
    )


def tiny_dit() -> DiTTransformer2DModel:
    """Learned variance (out_channels = 2 × in_channels) and a null class, as DiT-XL-2."""
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS,
        num_layers=1,
        sample_size=LATENT_SIZE,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_num_groups=4,
    )


def tiny_sd_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=4,
    )


def tiny_sd3_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=2 * TEXT_WIDTH,  # both CLIP encoders' states side by side
        caption_projection_dim=16,
        pooled_projection_dim=2 * TEXT_WIDTH,
        pos_embed_max_size=LATENT_SIZE,
    )


def write_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single lowercase letters (a word ends with a `</w>` letter), from files."""
    directory.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(letter + "</w>" for letter in letters)]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": TEXT_LENGTH}))
    return CLIPTokenizer.from_pretrained(directory)


def tiny_clip_text(with_projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=2 + 2 * 26,
        hidden_size=TEXT_WIDTH,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _unigram(specials: list[str]) -> Tokenizer:
    """A SentencePiece-style unigram tokenizer over single letters (and "▁"-prefixed word starts), built in code."""
    letters = list(string.ascii_lowercase)
    vocab = [(token, 0.0) for token in specials] + [("▁", -1.0)]
    vocab += [(letter, -2.0) for letter in letters] + [("▁" + letter, -1.5) for letter in letters]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=specials.index("<unk>")))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return tokenizer


UNIGRAM_VOCAB = 3 + 1 + 2 * 26  # the T5 tokenizer's size; Gemma's has one special more


def tiny_t5() -> tuple[T5TokenizerFast, T5EncoderModel]:
    tokenizer = T5TokenizerFast(
        tokenizer_object=_unigram(["<pad>", "</s>", "<unk>"]), pad_token="<pad>", eos_token="</s>",
        unk_token="<unk>", extra_ids=0, model_max_length=512,
    )  # fmt: skip
    config = T5Config(
        vocab_size=UNIGRAM_VOCAB, d_model=TEXT_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return tokenizer, T5EncoderModel(config)


def tiny_gemma() -> tuple[GemmaTokenizerFast, Gemma2Model]:
    tokenizer = GemmaTokenizerFast(
        tokenizer_object=_unigram(["<pad>", "<eos>", "<bos>", "<unk>"]), pad_token="<pad>", eos_token="<eos>",
        bos_token="<bos>", unk_token="<unk>", model_max_length=4096,
    )  # fmt: skip
    config = Gemma2Config(
        vocab_size=UNIGRAM_VOCAB + 1, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    return tokenizer, Gemma2Model(config)


def tiny_sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=2 * TEXT_WIDTH, attention_head_dim=4,
        norm_num_groups=4, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 4,
    )  # fmt: skip


def tiny_flux_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


def tiny_pixart_transformer() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=LATENT_CHANNELS, out_channels=2 * LATENT_CHANNELS,
        num_layers=1, norm_num_groups=4, cross_attention_dim=16, caption_channels=TEXT_WIDTH,
        sample_size=LATENT_SIZE, patch_size=2,
    )  # fmt: skip


def tiny_sana() -> tuple[AutoencoderDC, SanaTransformer2DModel]:
    autoencoder = AutoencoderDC(
        in_channels=3, latent_channels=LATENT_CHANNELS, attention_head_dim=4, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()), upsample_block_type="interpolate", downsample_block_type="conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.5,
    )  # fmt: skip
    transformer = SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
        num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=TEXT_WIDTH, sample_size=2 * LATENT_SIZE, patch_size=1,
    )  # fmt: skip
    return autoencoder, transformer


def build_pipeline(kind: str, workdir: Path, seed: int = 0) -> DiffusionPipeline:
    """The `kind` pipeline (see `KINDS`) with seeded random weights, not yet saved."""
    torch.manual_seed(seed)
    if kind == "ldm_kl":
        return LDMPipeline(vqvae=tiny_vae(scaling_factor=0.5), unet=tiny_latent_unet(), scheduler=DDIMScheduler())
    if kind == "ldm_vq":
        return LDMPipeline(vqvae=tiny_vq(), unet=tiny_latent_unet(), scheduler=DDIMScheduler())
    if kind == "dit":
        return DiTPipeline(transformer=tiny_dit(), vae=tiny_vae(), scheduler=DDIMScheduler())
    tokenizer = write_clip_tokenizer(workdir / "tokenizer-files")
    if kind == "sd":
        return StableDiffusionPipeline(
            vae=tiny_vae(),
            text_encoder=tiny_clip_text(),
            tokenizer=tokenizer,
            unet=tiny_sd_unet(),
            scheduler=DDPMScheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if kind in ("sd3", "sd3_t5"):
        t5_tokenizer, t5 = tiny_t5() if kind == "sd3_t5" else (None, None)
        return StableDiffusion3Pipeline(
            transformer=tiny_sd3_transformer(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=tiny_clip_text(with_projection=True),
            tokenizer=tokenizer,
            text_encoder_2=tiny_clip_text(with_projection=True),
            tokenizer_2=tokenizer,
            text_encoder_3=t5,
            tokenizer_3=t5_tokenizer,
        )
    if kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=tiny_vae(), text_encoder=tiny_clip_text(), text_encoder_2=tiny_clip_text(with_projection=True),
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=tiny_sdxl_unet(), scheduler=EulerDiscreteScheduler(),
        )  # fmt: skip
    if kind == "flux":
        t5_tokenizer, t5 = tiny_t5()
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=4, max_image_seq_len=64
        )
        return FluxPipeline(
            scheduler=scheduler,
            vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=tiny_clip_text(), tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
            transformer=tiny_flux_transformer(),
        )  # fmt: skip
    if kind in ("pixart_alpha", "pixart_sigma"):
        t5_tokenizer, t5 = tiny_t5()
        cls = PixArtAlphaPipeline if kind == "pixart_alpha" else PixArtSigmaPipeline
        return cls(
            tokenizer=t5_tokenizer, text_encoder=t5, vae=tiny_vae(), transformer=tiny_pixart_transformer(),
            scheduler=DPMSolverMultistepScheduler(),
        )  # fmt: skip
    if kind == "sana":
        gemma_tokenizer, gemma = tiny_gemma()
        autoencoder, transformer = tiny_sana()
        scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
        return SanaPipeline(
            tokenizer=gemma_tokenizer, text_encoder=gemma, vae=autoencoder, transformer=transformer, scheduler=scheduler
        )
    raise ValueError(f"Unknown pipeline kind {kind!r}; choose one of {sorted(KINDS)}.")


def save_and_reload(pipeline: DiffusionPipeline, directory: Path) -> DiffusionPipeline:
    """Save, then load with `DiffusionPipeline.from_pretrained` as from the Hub.

    A DiT repo's model_index.json carries its `id2label` (DiTPipeline reads it into `labels`); SD3 without its
    T5 encoder is loaded with `text_encoder_3=None, tokenizer_3=None`, as diffusers documents."""
    pipeline.save_pretrained(directory)
    if isinstance(pipeline, DiTPipeline):
        index = json.loads((directory / "model_index.json").read_text())
        index["id2label"] = {str(i): name for i, name in enumerate(DIGIT_NAMES)}
        (directory / "model_index.json").write_text(json.dumps(index))
    extra = {"text_encoder_3": None, "tokenizer_3": None} if isinstance(pipeline, StableDiffusion3Pipeline) else {}
    return DiffusionPipeline.from_pretrained(directory, **extra)


def saved_pipeline(kind: str, workdir: Path, seed: int = 0) -> DiffusionPipeline:
    return save_and_reload(build_pipeline(kind, workdir, seed), workdir / kind)


def lora_pipeline(workdir: Path, rank: int = 2, seed: int = 1) -> tuple[DiffusionPipeline, Path]:
    """A Stable Diffusion base pipeline with a LoRA adapter loaded from its saved weights file.

    The adapter covers the attention projections and ResNet convolutions; its `B` matrices are random (a
    trained adapter's are not zero). Returns the reloaded pipeline and the LoRA weights folder."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    base = saved_pipeline("sd", workdir)
    adapted = DiffusionPipeline.from_pretrained(workdir / "sd")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    adapted.unet.add_adapter(config)
    torch.manual_seed(seed)
    for name, module in adapted.unet.named_modules():
        if name.endswith(".lora_B.default"):
            torch.nn.init.normal_(module.weight, std=0.2)
    lora_dir = workdir / "lora"
    StableDiffusionPipeline.save_lora_weights(lora_dir, unet_lora_layers=get_peft_model_state_dict(adapted.unet))
    base.load_lora_weights(lora_dir)
    return base, lora_dir


def digit_dataset(count: int, offset: int = 0, size: int = IMAGE_SIZE) -> datasets.Dataset:
    """Real MNIST digits (size × size) with `label` (class id), `name` (class name) and `text` (a caption) columns."""
    digits = mnist_demo_dataset(offset + count, size).select(range(offset, offset + count))
    names = [DIGIT_NAMES[label] for label in digits["label"]]
    digits = digits.add_column("name", names)
    return digits.add_column("text", [f"a digit {name}" for name in names])
