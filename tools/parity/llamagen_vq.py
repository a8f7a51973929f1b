"""Parity fixture for LlamaGen's VQ-16 image tokenizer. transformers' JanusVQVAE is the same
architecture (Janus reuses LlamaGen's tokenizer) under other names; this builds it at a tiny random
config and writes its weights under LlamaGen's checkpoint names (`encoder.conv_blocks.{i}.res.{j}`,
`mid.{0,1,2}`, `decoder.conv_blocks.{i}...`), the mapping transformers' own conversion script uses.
The codebook rows are unit length, as LlamaGen's l2-normalised quantizer sees them (Janus's
quantizer does not normalise).

Usage: llamagen_vq.py <out-dir>

Writes `<out-dir>/config.json` (our `LlamaGenVqConfig`), `model.safetensors` and `io.safetensors`:
`pixels` [2, 3, 16, 16], `codes` [2, 8, 8] (encode), `decode_codes` [2, 8, 8] (random) and
`decoded` [2, 3, 16, 16].
"""
import json
import os
import re
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

CONFIG = dict(base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, embed_dim=8, num_embeddings=32,
              latent_channels=16, num_patches=8)


def llamagen_name(key: str) -> str:
    key = re.sub(r"^(encoder)\.down\.(\d+)\.block\.", r"\1.conv_blocks.\2.res.", key)
    key = re.sub(r"^(encoder)\.down\.(\d+)\.", r"\1.conv_blocks.\2.", key)
    key = re.sub(r"^(decoder)\.up\.(\d+)\.block\.", r"\1.conv_blocks.\2.res.", key)
    key = re.sub(r"^(decoder)\.up\.(\d+)\.", r"\1.conv_blocks.\2.", key)
    for old, new in (("mid.block_1", "mid.0"), ("mid.attn_1", "mid.1"), ("mid.block_2", "mid.2")):
        key = key.replace(old, new)
    return key


def main() -> None:
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    model = JanusVQVAE(JanusVQVAEConfig(**CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.05))
        model.quantize.embedding.weight.copy_(F.normalize(model.quantize.embedding.weight, dim=-1))
    state = {llamagen_name(k): v.contiguous() for k, v in model.state_dict().items()
             if k.startswith(("encoder.", "decoder.", "quantize.embedding", "quant_conv", "post_quant_conv"))}
    save_file(state, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"codebook_size": CONFIG["num_embeddings"], "codebook_embed_dim": CONFIG["embed_dim"],
                   "z_channels": CONFIG["latent_channels"], "ch": CONFIG["base_channels"],
                   "ch_mult": CONFIG["channel_multiplier"], "num_res_blocks": CONFIG["num_res_blocks"]}, f, indent=1)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    decode_codes = torch.randint(0, CONFIG["num_embeddings"], (2, 64))
    with torch.no_grad():
        codes = model.encode(pixels).image_tokens.view(2, 8, 8)
        decoded = model.decode(decode_codes)
    save_file({"pixels": pixels, "codes": codes, "decode_codes": decode_codes.view(2, 8, 8), "decoded": decoded},
              os.path.join(out, "io.safetensors"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
