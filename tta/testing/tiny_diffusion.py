"""A tiny Stable-Diffusion image-variation pipeline with seeded random weights.

It runs the real `StableDiffusionImageVariationPipeline` code path (CLIP image encoder ->
UNet denoising loop with classifier-free guidance -> VAE decode) in well under a second on CPU,
so tests and offline demos exercise DiffTPT's generation stage without downloading the
~5 GB lambdalabs weights. Its images are noise-like: it measures cost and plumbing, not quality.
"""

from __future__ import annotations

from typing import Any

from tta.models import quiet_loggers as _quiet
from tta.models import seeded as _seeded

TINY_RESOLUTION = 32  # pixels; the VAE below downsamples by 2, so latents are 16 x 16


def build_tiny_variation_pipeline(seed: int = 0) -> Any:
    """A `StableDiffusionImageVariationPipeline` (fp32, CPU) built from configs, no download."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionImageVariationPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with _seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=TINY_RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=TINY_RESOLUTION,
        )
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                projection_dim=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=TINY_RESOLUTION,
                patch_size=4,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False
    )
    processor = CLIPImageProcessor(size=TINY_RESOLUTION, crop_size=TINY_RESOLUTION)
    with _quiet(("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_image_variation",)):
        pipe = StableDiffusionImageVariationPipeline(
            vae=vae.eval(), image_encoder=image_encoder.eval(), unet=unet.eval(), scheduler=scheduler,
            safety_checker=None, feature_extractor=processor, requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd_variation_random(seed: int = 0) -> Any:
    """The real lambdalabs architecture (SD 1.x UNet at 512 px, SD VAE, CLIP ViT-L/14 image
    encoder) with random weights: ~1.2 G parameters, for measuring cost on a GPU without the
    download. Its images are noise; never serve it."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionImageVariationPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with _seeded(seed):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=512, layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=224, patch_size=14, projection_dim=768,
        ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True)
    with _quiet(("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_image_variation",)):
        pipe = StableDiffusionImageVariationPipeline(
            vae=vae.eval(), image_encoder=image_encoder.eval(), unet=unet.eval(), scheduler=scheduler,
            safety_checker=None, feature_extractor=CLIPImageProcessor(), requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
