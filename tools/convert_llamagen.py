"""Converts a LlamaGen checkpoint (PyTorch `.pt`, as the LlamaGen repository publishes them: the T2I
GPT, or the VQ-16 tokenizer `vq_ds16_t2i.pt`) to the safetensors file proxytune loads: the `"model"` state dict (or the top-level dict when there is
none), `_orig_mod.` prefixes from torch.compile stripped, KV-cache buffers dropped. Keys keep the
reference names (`tok_embeddings.weight`, `layers.N.attention.wqkv.weight`, ...).

Usage: convert_llamagen.py <checkpoint.pt> <out.safetensors>
"""
import sys

import torch
from safetensors.torch import save_file


def main() -> None:
    src, dst = sys.argv[1], sys.argv[2]
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    out = {}
    for key, value in state.items():
        key = key.removeprefix("_orig_mod.")
        if ".kv_cache." in key or key == "freqs_cis":
            continue
        out[key] = value.contiguous()
    save_file(out, dst)
    print(f"wrote {len(out)} tensors to {dst}")


if __name__ == "__main__":
    main()
