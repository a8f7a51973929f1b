"""The diffusers side of `proxytune bench unet`: the same UNet config timed in PyTorch.

Usage: unet_diffusers.py <out-dir> <iters>

Writes `<out-dir>/config.json` (the UNet config both sides use) and prints one JSON line with the
median seconds of a sampling step (no grad, batch 2 = CFG pair) and of a train step (gradients
cleared, forward, MSE, backward; batch 2), with the train step's forward and backward apart, on
CPU, float32, 32x32 latents, 77 context tokens.
"""
import json
import os
import statistics
import sys
import time

import torch
from diffusers import UNet2DConditionModel

CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(128, 256, 256), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=256, attention_head_dim=8,
)


def timed(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    out_dir, iters = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIG)
    unet.save_config(out_dir)
    params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(2, 4, 32, 32)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, 256)
    target = torch.randn(2, 4, 32, 32)

    def sample_step():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)

    def train_step():
        start = time.perf_counter()
        unet.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=ctx).sample, target)
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        return middle - start, end - middle, end - start

    unet.eval()
    sample = timed(sample_step, iters)
    unet.train()
    train_step()
    phases = [train_step() for _ in range(iters)]
    forward, backward, train = (statistics.median(p[i] for p in phases) for i in range(3))
    print(json.dumps({
        "params": params, "threads": torch.get_num_threads(), "sample_step_s": sample,
        "train_step_s": train, "train_forward_s": forward, "train_backward_s": backward,
    }))


if __name__ == "__main__":
    main()
