"""Parity fixtures for the ViT (DINO layout) and CLIP families, from transformers at tiny random
configs.

Usage: vit_clip.py <fixtures-dir>

Writes, per model, `<name>/config.json` (the reference's own config), `<name>/model.safetensors`
(its state dict, reference key names) and `<name>/io.safetensors` (fixed inputs and the
reference's outputs). Seeds are fixed; rerunning gives the same files.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel


def dump(model, io: dict, out: str) -> None:
    # save_pretrained writes the published checkpoint layout (the key names real checkpoints on
    # the Hub use), which can differ from the in-memory module names of recent transformers.
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1, sort_keys=True)
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"))
    print(f"wrote {out}")


def vit(out: str) -> None:
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_act="gelu", layer_norm_eps=1e-6, image_size=32, patch_size=8, num_channels=3,
        qkv_bias=True,
    )
    model = ViTModel(config, add_pooling_layer=False).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = model(pixel_values=pixel_values).last_hidden_state
    dump(model, {"pixel_values": pixel_values, "last_hidden_state": last}, out)


def clip(out: str) -> None:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
            eos_token_id=99, bos_token_id=98, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, hidden_act="quick_gelu",
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    # Two prompts: a full one and a padded one, both ending in the end-of-text id 99.
    input_ids = torch.tensor([[98, 5, 17, 42, 7, 3, 99], [98, 11, 23, 99, 0, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text = model.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        vision = model.vision_model(pixel_values=pixel_values)
        text_embeds = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        image_embeds = model.get_image_features(pixel_values=pixel_values)
    if not torch.is_tensor(text_embeds):
        text_embeds = text_embeds.pooler_output
    if not torch.is_tensor(image_embeds):
        image_embeds = image_embeds.pooler_output
    io = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "text_last_hidden_state": text.last_hidden_state,
        "text_pooled": text.pooler_output,
        "text_penultimate": text.hidden_states[-2],
        "text_embeds": text_embeds,
        "vision_last_hidden_state": vision.last_hidden_state,
        "vision_pooled": vision.pooler_output,
        "image_embeds": image_embeds,
    }
    dump(model, io, out)


if __name__ == "__main__":
    root = sys.argv[1]
    vit(os.path.join(root, "vit_tiny"))
    clip(os.path.join(root, "clip_tiny"))
