"""Parity fixture for LoRA interchange: a PEFT LoRA on the tiny SD UNet's attention projections,
saved by diffusers in the layout `load_lora_weights` reads, and the UNet's output with it active.

Usage: lora.py <fixtures-dir>

Reads `unet_sd_tiny/` (from unet.py) and writes `lora_sd_tiny/pytorch_lora_weights.safetensors`
(keys `unet.<module>.lora_A.weight` / `lora_B.weight`, rank 4, alpha 4) and
`lora_sd_tiny/io.safetensors` with `out` = the UNet output on unet_sd_tiny's inputs.
"""
import os
import sys

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file


def main() -> None:
    root = sys.argv[1]
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet_sd_tiny")).eval()
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    out_dir = os.path.join(root, "lora_sd_tiny")
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    io = load_file(os.path.join(root, "unet_sd_tiny", "io.safetensors"))
    with torch.no_grad():
        out = unet(io["sample"], io["timesteps"], encoder_hidden_states=io["context"]).sample
    save_file({"out": out.contiguous()}, os.path.join(out_dir, "io.safetensors"))
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
