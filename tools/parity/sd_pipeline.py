"""Parity fixture for the whole Stable Diffusion sampling path: diffusers' StableDiffusionPipeline
built from tiny random components, saved as a diffusers model folder, sampled for 10 DDIM steps
and 10 Euler steps with classifier-free guidance from fixed latents.

Usage: sd_pipeline.py <bpe_simple_vocab_16e6.txt.gz> <out-dir>

The tokenizer is the real CLIP BPE truncated to its first 486 merges (a 1000-token vocabulary, so
the tiny text encoder stays small). Writes the model folder and `io.safetensors` with `latents`,
`ddim_image` and `euler_image` ([1, 3, 16, 16] in [0, 1]) for the prompt below.
"""
import os
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from clip_bpe import write_vocab_merges  # noqa: E402

PROMPT, NEGATIVE = "a sks dog on the beach", ""
MERGES = 486




def main() -> None:
    bpe, out = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_vocab_merges(bpe, tmp, MERGES)
        tokenizer = CLIPTokenizer(vocab_path, merges_path, model_max_length=77)
    vocab_size = 512 + MERGES + 2
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu"))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    with torch.no_grad():
        for module in (text_encoder, unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    latents = torch.randn(1, 4, 8, 8)
    io = {"latents": latents}
    for name in ["ddim", "euler"]:
        # The reference is the pipeline as a user loads it from the saved folder.
        pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
        if name == "euler":
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        with torch.no_grad():
            image = pipe(PROMPT, negative_prompt=NEGATIVE, latents=latents.clone(), num_inference_steps=10,
                         guidance_scale=7.5, output_type="pt").images
        io[f"{name}_image"] = image
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
