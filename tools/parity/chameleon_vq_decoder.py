"""Parity fixture for the Chameleon VQ-VAE decoder. transformers ships only the encoder; the
decoder of Chameleon's original image tokenizer is the taming-transformers VQGAN `Decoder`
(`taming-transformers-rom1504==0.0.6`, installed with --no-deps: key-for-key the same module).

Usage: chameleon_vq_decoder.py <chameleon-fixture-dir>

Reads the fixture's `config.json` (its `vq_config`) and writes, beside it,
`vq_decoder.safetensors` in the original checkpoint's layout (`decoder.*`, `post_quant_conv.*`,
`quantize.embedding.weight`) and `vq_decoder_io.safetensors` with `codes` [2, 8, 8] and `image`
[2, 3, 16, 16] (the decoder's output for those codes).
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from taming.modules.diffusionmodules.model import Decoder


def main() -> None:
    out = sys.argv[1]
    with open(os.path.join(out, "config.json")) as f:
        vq = json.load(f)["vq_config"]
    torch.manual_seed(1)
    decoder = Decoder(ch=vq["base_channels"], out_ch=vq.get("in_channels", 3), ch_mult=vq["channel_multiplier"],
                      num_res_blocks=vq["num_res_blocks"], attn_resolutions=vq.get("attn_resolutions") or [],
                      dropout=0.0, in_channels=vq.get("in_channels", 3), resolution=vq["resolution"],
                      z_channels=vq["latent_channels"]).eval()
    codebook = torch.nn.Embedding(vq["num_embeddings"], vq["embed_dim"])
    post_quant_conv = torch.nn.Conv2d(vq["embed_dim"], vq["latent_channels"], 1)
    with torch.no_grad():
        for module in (decoder, codebook, post_quant_conv):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    weights = {f"decoder.{k}": v for k, v in decoder.state_dict().items()}
    weights["quantize.embedding.weight"] = codebook.weight.detach()
    weights.update({f"post_quant_conv.{k}": v for k, v in post_quant_conv.state_dict().items()})
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out, "vq_decoder.safetensors"))
    side = vq["resolution"] // 2 ** (len(vq["channel_multiplier"]) - 1)
    codes = torch.randint(0, vq["num_embeddings"], (2, side, side))
    with torch.no_grad():
        z = F.embedding(codes, codebook.weight).permute(0, 3, 1, 2)
        image = decoder(post_quant_conv(z))
    save_file({"codes": codes, "image": image.contiguous()}, os.path.join(out, "vq_decoder_io.safetensors"))
    print(f"wrote {out}/vq_decoder*.safetensors")


if __name__ == "__main__":
    main()
