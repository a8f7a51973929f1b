"""Parity fixture for the SDXL sampling path: diffusers' StableDiffusionXLPipeline built from tiny
random components (two CLIP text encoders, the second with a projection; a `text_time` UNet),
saved as a diffusers model folder and sampled for 10 Euler steps with classifier-free guidance
from fixed latents.

Usage: sdxl_pipeline.py <bpe_simple_vocab_16e6.txt.gz> <out-dir>

Writes the model folder and `io.safetensors` with `latents`, `prompt_embeds` ([1, 77, 32]: both
encoders' penultimate hidden states, concatenated), `pooled_prompt_embeds` ([1, 8]: the second
encoder's projected pooled output), `euler_image` ([1, 3, 16, 16] in [0, 1]) for the prompt below
with no negative prompt (SDXL then uses zero embeddings for the unconditional branch).
"""
import os
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from clip_bpe import write_vocab_merges  # noqa: E402

PROMPT = "a sks dog on the beach"
MERGES = 486
PROJECTION = 8


def text_config(hidden: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=512 + MERGES + 2, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
                          hidden_act="gelu", **extra)


def main() -> None:
    bpe, out = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_vocab_merges(bpe, tmp, MERGES)
        tokenizer = CLIPTokenizer(vocab_path, merges_path, model_max_length=77)
        tokenizer_2 = CLIPTokenizer(vocab_path, merges_path, model_max_length=77, pad_token="!")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(16))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(16, projection_dim=PROJECTION))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=PROJECTION + 6 * 4, norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    with torch.no_grad():
        for module in (text_encoder, text_encoder_2, unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out, safe_serialization=True)
    latents = torch.randn(1, 4, 8, 8)
    # The reference is the pipeline as a user loads it from the saved folder.
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
        image = pipe(PROMPT, latents=latents.clone(), num_inference_steps=10, guidance_scale=5.0,
                     height=16, width=16, output_type="pt").images
    io = {"latents": latents, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "euler_image": image}
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
