"""The transformers side of `proxytune bench ar`: one Chameleon config timed in PyTorch.

Usage: ar_transformers.py <out-dir> <iters>

Builds a ~50 M-parameter ChameleonForConditionalGeneration (random weights), writes it to
`<out-dir>` (config.json + model.safetensors: the Rust side loads the very same weights) and prints
one JSON line: parameters, threads, the median seconds to generate 256 tokens greedily after a
32-token prompt with the KV cache (batch 1), and of a train step (forward, cross-entropy, backward)
on 2 sequences of 288 tokens. CPU, float32.
"""
import json
import statistics
import sys
import time

import torch
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

VOCAB, CODES = 8192 + 64, 8192
PROMPT, NEW = 32, 256


def config() -> ChameleonConfig:
    vm = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<image>": 4}
    vm.update({f"w{i}": i for i in range(5, 64)})
    for code in range(CODES):
        vm["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"] = 64 + code
    return ChameleonConfig(
        vocab_size=VOCAB, hidden_size=640, intermediate_size=1728, num_hidden_layers=8, num_attention_heads=10,
        num_key_value_heads=10, max_position_embeddings=1024, vocabulary_map=vm, pad_token_id=3,
        vq_config=dict(embed_dim=8, num_embeddings=CODES, latent_channels=8, resolution=16, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[]))


def timed(fn, iters):
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    out_dir, iters = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = ChameleonForConditionalGeneration(config())
    model.save_pretrained(out_dir, safe_serialization=True)
    params = sum(p.numel() for p in model.model.layers.parameters()) + model.model.embed_tokens.weight.numel() \
        + model.lm_head.weight.numel()
    prompt = torch.randint(5, 64, (1, PROMPT))
    seqs = torch.randint(5, 64, (2, PROMPT + NEW))

    def sample():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=3,
                           eos_token_id=None)

    def train():
        model.zero_grad(set_to_none=True)
        model(input_ids=seqs, labels=seqs).loss.backward()

    model.eval()
    sample_s = timed(sample, iters)
    train_s = timed(train, iters)
    print(json.dumps({"params": params, "threads": torch.get_num_threads(), "generate_s": sample_s,
                      "new_tokens": NEW, "train_step_s": train_s}))


if __name__ == "__main__":
    main()
