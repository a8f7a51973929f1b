"""Parity fixture for image preprocessing: transformers' CLIP and ViT image processors (PIL
backend) on real DreamBench photos.

Usage: image_processors.py <dreambench-dir> <fixture-out>

Writes `clip` and `dino` ([2, 3, 224, 224], float16 to keep the file small) for the photos
`dog/00.png` and `teapot/00.png` (128 px), processed like `openai/clip-vit-base-patch32`
(shortest edge 224, bicubic, centre crop 224, CLIP mean/std) and like the DINO ViT-S/16
checkpoint (224 x 224 bilinear, ImageNet mean/std).
"""
import os
import sys

import numpy as np
from PIL import Image
from safetensors.numpy import save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

PHOTOS = ["dog/00.png", "teapot/00.png"]


def main() -> None:
    root, out = sys.argv[1], sys.argv[2]
    images = [Image.open(os.path.join(root, p)).convert("RGB") for p in PHOTOS]
    clip = CLIPImageProcessorPil()
    dino = ViTImageProcessorPil(size={"height": 224, "width": 224}, resample=2,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    tensors = {
        "clip": clip(images=images, return_tensors="np")["pixel_values"].astype(np.float16),
        "dino": dino(images=images, return_tensors="np")["pixel_values"].astype(np.float16),
    }
    save_file(tensors, out, metadata={"photos": ",".join(PHOTOS)})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
