"""Parity fixture for the Chameleon / Lumina-mGPT student: transformers'
ChameleonForConditionalGeneration at a tiny random config (grouped-query attention, qk-norm,
RoPE, a VQ-VAE encoder with an attention level) with a vocabulary map whose image tokens are a
permutation of the VQ codes.

Usage: chameleon.py <out-dir>

Writes `config.json` + `model.safetensors` (save_pretrained) and `io.safetensors` with:
- `ids` [2, 12] text token ids and `raw_logits` (lm_head of the final hidden states) and
  `logits` (the model's output, image tokens masked as transformers does for text generation);
- `pixels` [2, 3, 16, 16] in [-1, 1], `codes` [2, 64] (VQ indices), `bpe` [2, 64] (their vocabulary
  ids), and `mm_ids` / `mm_logits`: a sequence with 64 `<image>` placeholders filled from `pixels[0]`;
- `prompt` [1, 5], `greedy` [1, 8]: greedy continuation (generate, do_sample=False);
- `sampled` [1, 8] and `sampled_scores` [8, 96]: generate(do_sample=True, temperature=0.7, top_k=12,
  top_p=0.9, seed 0) and the processed scores at each step;
- `text_ids`: the `tokenizer.json` ids of "a photo of sks dog on the beach".
"""
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

VOCAB, CODES = 96, 32


WORDS = ("a an the of on in at with and by sks dog cat backpack teapot toy robot sneaker red blue green yellow "
         "purple white black striped dotted shiny wooden photo picture image generate according to following "
         "prompt beach snow forest city street table floor grass water mountain kitchen garden room sunset night "
         "top bottom front back sitting standing").split()


def vocabulary_map() -> dict:
    vm = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    vm.update({w: 5 + i for i, w in enumerate(WORDS[:59])})
    for j in range(CODES):
        code = (j * 5) % CODES
        vm["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"] = 64 + j
    return vm


def main() -> None:
    out = sys.argv[1]
    torch.manual_seed(0)
    cfg = ChameleonConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, vocabulary_map=vocabulary_map(), pad_token_id=3,
        vq_config=dict(embed_dim=8, num_embeddings=CODES, latent_channels=8, resolution=16, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[8]))
    model = ChameleonForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    model = ChameleonForConditionalGeneration.from_pretrained(out).eval()
    # A word-level text tokenizer over the same vocabulary (the real checkpoints ship a BPE
    # tokenizer.json; the loader reads either).
    text_vocab = {k: v for k, v in vocabulary_map().items() if not k.startswith("IMGIMG")}
    tok = Tokenizer(WordLevel(text_vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(os.path.join(out, "tokenizer.json"))
    io_prompt = tok.encode("a photo of sks dog on the beach").ids

    io = {}
    ids = torch.randint(5, 64, (2, 12))
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        io["ids"], io["raw_logits"], io["logits"] = ids, model.lm_head(hidden), model(input_ids=ids).logits
        enc = model.model.vqmodel.encode(pixels, return_dict=True)
        io["pixels"], io["codes"] = pixels, enc.image_tokens.view(2, -1)
        io["bpe"] = model.model.get_image_tokens(pixels)
        mm_ids = torch.cat([torch.tensor([[1, 7, 8]]), torch.full((1, 64), 4), torch.tensor([[9, 10]])], dim=1)
        io["mm_ids"], io["mm_logits"] = mm_ids, model(input_ids=mm_ids, pixel_values=pixels[:1]).logits
        prompt = torch.tensor([[1, 11, 12, 13, 14]])
        io["prompt"] = prompt
        greedy = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=3, eos_token_id=None)
        io["greedy"] = greedy[:, prompt.shape[1]:]
        torch.manual_seed(0)
        sampled = model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=12, top_p=0.9,
                                 pad_token_id=3, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        io["sampled"] = sampled.sequences[:, prompt.shape[1]:]
        io["sampled_scores"] = torch.cat(sampled.scores, dim=0)
        io["text_ids"] = torch.tensor(io_prompt)
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
