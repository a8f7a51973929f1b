"""Parity fixture for the DreamBooth optimiser loop, as diffusers' training scripts run it:
`torch.optim.AdamW`, `get_scheduler("constant_with_warmup")`, `clip_grad_norm_` and
`diffusers.training_utils.EMAModel` (no EMA warm-up, decay 0.9).

Usage: optim.py <fixture-out>

Two parameters `a` `[3, 4]` and `b` `[5]`; for step s = 0..STEPS the gradients `grad.<s>.a`/`.b`
are given; after each optimiser step the fixture holds `param.<s>.a`/`.b`, `ema.<s>.a`/`.b` and
`lr.<s>` (the learning rate the step used). Hyper-parameters in `config.*`.
"""
import sys

import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

STEPS, LR, WD, BETAS, EPS, CLIP, WARMUP, EMA_DECAY = 6, 0.05, 0.01, (0.9, 0.999), 1e-8, 1.0, 3, 0.9


def main() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(5))
    params = [a, b]
    out = {"init.a": a.detach().clone(), "init.b": b.detach().clone()}
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    sched = get_scheduler("constant_with_warmup", optimizer=opt, num_warmup_steps=WARMUP)
    ema = EMAModel(params, decay=EMA_DECAY, use_ema_warmup=False)
    for s in range(STEPS):
        # Large gradients on some steps so that clipping is exercised.
        scale = 3.0 if s % 2 == 0 else 0.1
        ga, gb = torch.randn(3, 4) * scale, torch.randn(5) * scale
        out[f"grad.{s}.a"], out[f"grad.{s}.b"] = ga.clone(), gb.clone()
        a.grad, b.grad = ga.clone(), gb.clone()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        out[f"lr.{s}"] = torch.tensor([sched.get_last_lr()[0]], dtype=torch.float64)
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.step(params)
        out[f"param.{s}.a"], out[f"param.{s}.b"] = a.detach().clone(), b.detach().clone()
        out[f"ema.{s}.a"], out[f"ema.{s}.b"] = (p.clone() for p in ema.shadow_params)
    out["config"] = torch.tensor([LR, WD, BETAS[0], BETAS[1], EPS, CLIP, WARMUP, EMA_DECAY], dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1])
    print(f"wrote {sys.argv[1]}")


if __name__ == "__main__":
    main()
