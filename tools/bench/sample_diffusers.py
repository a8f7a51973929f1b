"""The reference side of `proxytune bench sample` for the supervisor: diffusers' pipeline.

Usage: sample_diffusers.py <model-dir> <resolution> <steps> <guidance> <batches> <repeats>

Loads the diffusers folder into `StableDiffusionPipeline` (its own DDIM scheduler, float32, CPU)
and times text-to-image sampling at each batch size of the comma-separated `<batches>` (one
warm-up call, then `<repeats>` calls; the median), with classifier-free guidance. Prints one JSON
line: threads and, per batch size, seconds per call and images per second.
"""
import json
import statistics
import sys
import time

import torch
from diffusers import StableDiffusionPipeline


def main() -> None:
    model_dir, resolution, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    guidance, batches, repeats = float(sys.argv[4]), [int(b) for b in sys.argv[5].split(",")], int(sys.argv[6])
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for batch in batches:
        def call():
            generator = torch.Generator().manual_seed(0)
            pipe(["a photo of a dog"] * batch, height=resolution, width=resolution, num_inference_steps=steps,
                 guidance_scale=guidance, generator=generator, output_type="np")
        call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append({"batch": batch, "call_s": seconds, "images_per_s": batch / seconds})
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
