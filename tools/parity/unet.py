"""Parity fixtures for UNet2DConditionModel (diffusers) at tiny random configs: an SD 1.x-style
UNet (conv projections) and an SDXL-style one (linear projections, per-block heads and transformer
depths, `text_time` additional conditioning).

Usage: unet.py <fixtures-dir>

Writes `unet_sd_tiny/` and `unet_sdxl_tiny/`, each with `save_pretrained` output (config.json,
diffusion_pytorch_model.safetensors) and `io.safetensors` (inputs and the output `out`).
"""
import json
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

CONFIGS = {
    "unet_sd_tiny": dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    ),
    "unet_sdxl_tiny": dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8,
    ),
}


def main() -> None:
    root = sys.argv[1]
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**cfg).eval()
        # Random weights everywhere (zero-initialised output layers would hide errors).
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        out_dir = os.path.join(root, name)
        unet.save_pretrained(out_dir, safe_serialization=True)
        with open(os.path.join(out_dir, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
        sample = torch.randn(2, 4, 16, 16)
        timesteps = torch.tensor([10, 500])
        context = torch.randn(2, 7, 16)
        io = {"sample": sample, "timesteps": timesteps, "context": context}
        kwargs = {}
        if cfg.get("addition_embed_type") == "text_time":
            io["text_embeds"] = torch.randn(2, 16)
            io["time_ids"] = torch.tensor([[128.0, 128, 0, 0, 128, 128], [64.0, 96, 8, 4, 128, 128]])
            kwargs["added_cond_kwargs"] = {"text_embeds": io["text_embeds"], "time_ids": io["time_ids"]}
        with torch.no_grad():
            io["out"] = unet(sample, timesteps, encoder_hidden_states=context, **kwargs).sample
        save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out_dir, "io.safetensors"))
        print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
