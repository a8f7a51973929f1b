"""Loads each of the world's model folders with its reference library, as a user would, and runs it.

Usage: check_world_models.py <models/world>

- supervisor: diffusers' StableDiffusionPipeline.from_pretrained, 3 DDIM steps at 32 px;
- student: transformers' ChameleonForConditionalGeneration.from_pretrained, one forward;
- clip: transformers' CLIPModel and CLIPTokenizer from the folder, text and image features;
- dino: transformers' ViTModel, one forward;
- llamagen/t5: transformers' T5EncoderModel and PreTrainedTokenizerFast from the folder, one
  caption (its ids and last hidden state, which the Rust test compares with proxytune's encoder).

Prints one JSON object with each folder's output shape (and the supervisor's pixel range); the Rust
test that calls it checks the shapes against the folders' configs.
"""
import json
import os
import sys

import torch


def features(out):
    """The projected features (transformers 5 wraps them in an output object)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def main() -> None:
    root = sys.argv[1]
    torch.manual_seed(0)
    out = {}

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(root, "supervisor"))
    image = pipe(
        "a sks dog on the beach", height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
        output_type="np",
    ).images
    out["supervisor"] = {"shape": list(image.shape), "min": float(image.min()), "max": float(image.max()),
                         "max_length": pipe.tokenizer.model_max_length}

    from transformers import ChameleonForConditionalGeneration, CLIPModel, CLIPTokenizer, ViTModel

    student = ChameleonForConditionalGeneration.from_pretrained(os.path.join(root, "student"))
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = student(input_ids=ids).logits
    out["student"] = {"shape": list(logits.shape)}

    clip_dir = os.path.join(root, "clip")
    clip = CLIPModel.from_pretrained(clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    text = tokenizer(["a dog on the beach", "a red teapot"], padding=True, return_tensors="pt")
    size = clip.config.vision_config.image_size
    with torch.no_grad():
        t = features(clip.get_text_features(**text))
        i = features(clip.get_image_features(pixel_values=torch.zeros(1, 3, size, size)))
    out["clip"] = {"text": list(t.shape), "image": list(i.shape)}

    dino = ViTModel.from_pretrained(os.path.join(root, "dino"), add_pooling_layer=False)
    size = dino.config.image_size
    with torch.no_grad():
        h = dino(pixel_values=torch.zeros(1, 3, size, size)).last_hidden_state
    out["dino"] = {"shape": list(h.shape)}

    from transformers import PreTrainedTokenizerFast, T5EncoderModel

    t5_dir = os.path.join(root, "llamagen", "t5")
    t5 = T5EncoderModel.from_pretrained(t5_dir)
    t5_tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(t5_dir, "tokenizer.json"))
    ids = t5_tok(["a sks dog on the beach"], return_tensors="pt")
    with torch.no_grad():
        h = t5(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    out["t5"] = {"ids": ids.input_ids[0].tolist(), "states": h[0].flatten().tolist(), "shape": list(h.shape)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
