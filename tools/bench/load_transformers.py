"""transformers' side of `proxytune bench real-size --python`: `from_pretrained` of a Chameleon folder.

Usage: load_transformers.py <model-dir> <device> <bf16|fp32>

Loads `<model-dir>` (config.json and the sharded safetensors with their index, written by the bench)
as ChameleonForConditionalGeneration in the given dtype straight onto the device, and prints one JSON
line: seconds, and the peak host memory above the process's baseline (taken after torch and the
device are initialised), the same measures proxytune's loader reports.
"""
import json
import sys
import time

import torch
from transformers import ChameleonForConditionalGeneration


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    folder, device, precision = sys.argv[1], sys.argv[2], sys.argv[3]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.zeros(1, device=device)
    baseline = status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = time.perf_counter()
    model = ChameleonForConditionalGeneration.from_pretrained(folder, dtype=dtype, device_map=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    print(json.dumps({
        "seconds": seconds,
        "parameters": parameters,
        "host_peak_above_baseline_bytes": max(0, status_bytes("VmHWM:") - baseline),
    }))


if __name__ == "__main__":
    main()
