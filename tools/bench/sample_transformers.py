"""The reference side of `proxytune bench sample` for the student: transformers' `generate`.

Usage: sample_transformers.py <out-dir> <grid> <images>

Builds the ~50 M-parameter Chameleon of `proxytune bench ar` (random weights, seed 0), writes it to
`<out-dir>` (config.json + model.safetensors: the Rust side samples with the very same weights) and
times the reference way of sampling a Lumina-mGPT image: one image at a time with transformers'
`generate`, classifier-free guidance by transformers' unbatched guidance processor (a second,
text-free sequence with its own KV cache, run beside the conditional one, as Lumina-mGPT's
processor does), image tokens only with top-k 2000, and the row breaks and the end forced. Prints
one JSON line: parameters, threads, images, tokens per image, seconds per image.
"""
import json
import os
import sys
import time

import torch
from transformers import ChameleonForConditionalGeneration, LogitsProcessor, LogitsProcessorList

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ar_transformers import CODES, config  # noqa: E402  (the shared bench config)

BOS, SEP, BREAK, EOSS, NEW_LINE, SIZE_BASE = 1, 5, 6, 7, 8, 9
GUIDANCE, TOP_K = 4.0, 2000


class ImageGrid(LogitsProcessor):
    """Image tokens only, except where the grid asks for a row break or the end: those are forced."""

    def __init__(self, prompt_len: int, grid: int, vocab: int):
        self.prompt_len, self.grid = prompt_len, grid
        self.images = torch.zeros(vocab, dtype=torch.bool)
        self.images[64:64 + CODES] = True

    def __call__(self, input_ids, scores):
        position = input_ids.shape[1] - self.prompt_len + 1  # 1-based position in the body
        body = self.grid * (self.grid + 1) + 1
        forced = EOSS if position == body else NEW_LINE if position % (self.grid + 1) == 0 else None
        if forced is not None:
            out = torch.full_like(scores, float("-inf"))
            out[:, forced] = 0.0
            return out
        return scores.masked_fill(~self.images, float("-inf"))


def main() -> None:
    out_dir, grid, images = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(config())
    model.save_pretrained(out_dir, safe_serialization=True)
    model.eval()
    params = sum(p.numel() for p in model.model.layers.parameters()) + model.model.embed_tokens.weight.numel() \
        + model.lm_head.weight.numel()
    units = grid // 2
    header = [BREAK, SIZE_BASE + units, SIZE_BASE + units]
    prompt = torch.tensor([[BOS] + list(range(20, 52)) + [SEP] + header])
    negative = torch.tensor([header])
    body = grid * (grid + 1) + 1
    processors = LogitsProcessorList([ImageGrid(prompt.shape[1], grid, model.config.vocab_size)])
    start = time.perf_counter()
    for seed in range(images):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=body, min_new_tokens=body, do_sample=True, top_k=TOP_K,
                                 guidance_scale=GUIDANCE, negative_prompt_ids=negative,
                                 logits_processor=processors, pad_token_id=3, eos_token_id=None)
        assert out.shape[1] == prompt.shape[1] + body, out.shape
    seconds = time.perf_counter() - start
    print(json.dumps({"params": params, "threads": torch.get_num_threads(), "images": images,
                      "tokens_per_image": body, "per_image_s": seconds / images, "prompt_tokens": prompt.shape[1]}))


if __name__ == "__main__":
    main()
