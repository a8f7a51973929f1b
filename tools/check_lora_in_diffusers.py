"""Loads a LoRA file written by proxytune into diffusers' UNet and runs it: the peer check that our
adapters mean the same in the reference implementation.

Usage: check_lora_in_diffusers.py <unet-dir> <lora.safetensors> <io.safetensors> <out.safetensors>

Reads the UNet (diffusers folder), loads the LoRA with `load_lora_adapter(prefix="unet")`, runs it
on `sample`, `timesteps`, `context` from `io`, and writes `out`.
"""
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file


def main() -> None:
    unet_dir, lora, io_path, out = sys.argv[1:5]
    unet = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    unet.load_lora_adapter(lora, prefix="unet", adapter_name="proxytune")
    io = load_file(io_path)
    with torch.no_grad():
        result = unet(io["sample"], io["timesteps"], encoder_hidden_states=io["context"]).sample
    save_file({"out": result.contiguous()}, out)


if __name__ == "__main__":
    main()
