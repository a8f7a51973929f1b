"""Converts Chameleon's image tokenizer checkpoint (`tokenizer/vqgan.ckpt` in Meta's release, a
PyTorch Lightning checkpoint of a taming-transformers VQModel) into the `vq_decoder.safetensors`
proxytune's student loads: the decoder (`decoder.*`), the `post_quant_conv` and the codebook
(`quantize.embedding.weight`), under the checkpoint's own names. The encoder side is not needed:
transformers' Chameleon folders carry it as `model.vqmodel.*`.

Usage: convert_chameleon_vqgan.py <vqgan.ckpt> <out-dir> [--trust-pickle]

The checkpoint is read with `torch.load(weights_only=True)`. A checkpoint whose hyper-parameters
hold pickled objects (e.g. an OmegaConf config) refuses that; `--trust-pickle` reads it with
`weights_only=False`, which runs the pickle's code: only for a file from a source you trust.
"""
import os
import sys

import torch
from safetensors.torch import save_file

KEPT = ("decoder.", "post_quant_conv.")
CODEBOOK = "quantize.embedding.weight"


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--trust-pickle"]
    if len(args) != 2:
        sys.exit(__doc__)
    src, out = args
    trust = "--trust-pickle" in sys.argv[1:]
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - the message names the file and the way out
        sys.exit(f"{src}: cannot read it with weights_only=True ({e}); if you trust the file, "
                 "rerun with --trust-pickle")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        sys.exit(f"{src}: no state_dict in the checkpoint")
    weights = {k: v.contiguous() for k, v in state.items()
               if isinstance(v, torch.Tensor) and (k.startswith(KEPT) or k == CODEBOOK)}
    missing = [k for k in (CODEBOOK, "post_quant_conv.weight", "decoder.conv_in.weight") if k not in weights]
    if missing:
        sys.exit(f"{src}: not a VQGAN checkpoint, it lacks {', '.join(missing)}")
    os.makedirs(out, exist_ok=True)
    dst = os.path.join(out, "vq_decoder.safetensors")
    save_file(weights, dst)
    print(f"wrote {len(weights)} tensors ({sum(v.numel() for v in weights.values())} values) to {dst}")


if __name__ == "__main__":
    main()
