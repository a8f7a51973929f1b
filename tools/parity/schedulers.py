"""Parity fixture for the noise schedules and samplers: diffusers' DDIMScheduler and
EulerDiscreteScheduler, including a 10-step classifier-free-guided sampling run from fixed noise
with a fixed stand-in denoiser.

Usage: schedulers.py <fixture-out>

Per case `<c>`: `<c>.alphas_cumprod`, `<c>.ddim_timesteps`, `<c>.euler_timesteps`,
`<c>.euler_sigmas`, `<c>.euler_init_noise_sigma`, `<c>.noise`, `<c>.ddim_final`, `<c>.euler_final`.
Case `sd` is Stable Diffusion's scheduler config (no clipping); the others keep diffusers' DDIM
default `clip_sample=True`. The stand-in denoiser is `0.05 * x + 0.001 * t / 1000` (conditional: on `1.1 * x`), guidance 7.5.
"""
import sys

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from safetensors.torch import save_file

CASES = {
    "sd": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
               set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading", prediction_type="epsilon"),
    "linear_trailing_v": dict(beta_schedule="linear", timestep_spacing="trailing", prediction_type="v_prediction"),
    "linspace": dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace"),
}
STEPS, GUIDANCE = 10, 7.5


def denoise(x, t):
    return 0.05 * x + 0.001 * float(t) / 1000.0


def run(scheduler, noise):
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        uncond, cond = denoise(x_in, t), denoise(1.1 * x_in, t)
        out = uncond + GUIDANCE * (cond - uncond)
        x = scheduler.step(out, t, x).prev_sample
    return x


def main() -> None:
    tensors = {}
    for name, cfg in CASES.items():
        ddim = DDIMScheduler(**cfg)
        euler_cfg = {k: v for k, v in cfg.items() if k not in ("set_alpha_to_one", "clip_sample")}
        euler = EulerDiscreteScheduler(**euler_cfg)
        ddim.set_timesteps(STEPS)
        euler.set_timesteps(STEPS)
        torch.manual_seed(0)
        noise = torch.randn(1, 4, 8, 8)
        tensors[f"{name}.alphas_cumprod"] = ddim.alphas_cumprod.clone()
        tensors[f"{name}.ddim_timesteps"] = ddim.timesteps.clone()
        tensors[f"{name}.euler_timesteps"] = euler.timesteps.to(torch.float32).clone()
        tensors[f"{name}.euler_sigmas"] = euler.sigmas.clone()
        tensors[f"{name}.euler_init_noise_sigma"] = torch.tensor([float(euler.init_noise_sigma)])
        tensors[f"{name}.noise"] = noise
        tensors[f"{name}.ddim_final"] = run(ddim, noise)
        tensors[f"{name}.euler_final"] = run(euler, noise)
    save_file({k: v.contiguous() for k, v in tensors.items()}, sys.argv[1])
    print(f"wrote {sys.argv[1]}")


if __name__ == "__main__":
    main()
