"""Parity fixture for AutoencoderKL (diffusers) at a tiny random config.

Usage: vae.py <out-dir>

Writes the model with `save_pretrained` (its config.json and diffusion_pytorch_model.safetensors,
diffusers key names) and `io.safetensors`: `x` [1, 3, 32, 32], the latent distribution's `mean`
and `logvar`, and `decoded` = decode(mean).
"""
import json
import os
import sys

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file


def main() -> None:
    out = sys.argv[1]
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32,
    ).eval()
    vae.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        decoded = vae.decode(dist.mean).sample
    save_file({"x": x, "mean": dist.mean.contiguous(), "logvar": dist.logvar.contiguous(), "decoded": decoded},
              os.path.join(out, "io.safetensors"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
