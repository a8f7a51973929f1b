"""Parity fixture for the CLIP tokenizer: transformers' CLIPTokenizer on the DreamBench prompts.

Usage: clip_tokenizer.py <bpe_simple_vocab_16e6.txt.gz> <dreambench-dir> <fixture-out.json>

Builds the tokenizer's `vocab.json`/`merges.txt` from OpenAI's merges file (the derivation the
original tokenizer uses), tokenises every DreamBench prompt template with the identifier `sks` and
every class noun, plus edge cases, with transformers, and writes `{prompt: ids}` (start and end
tokens included, no padding). The Rust test compares its own tokenizer against this file.
"""
import json
import os
import sys
import tempfile

from transformers import CLIPTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from clip_bpe import write_vocab_merges  # noqa: E402




def main() -> None:
    bpe, dreambench, out = sys.argv[1:4]
    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer(*write_vocab_merges(bpe, tmp))
    classes = sorted({line.split("\t")[1] for line in open(os.path.join(dreambench, "subjects.tsv")).read().splitlines()[1:]})
    templates = [l.split("\t", 1)[1] for l in open(os.path.join(dreambench, "prompts.txt")).read().splitlines() if l and not l.startswith("#")]
    prompts = sorted({t.format("sks", c) for t in templates for c in classes})
    prompts += [
        "A  SKS   Dog's toy, isn't it? 3 dogs & 42 cats!",
        "a photo of a sks backpack (front view) -- 128px, f/1.8",
        "naïve café",
    ]
    fixture = {p: tok(p)["input_ids"] for p in prompts}
    with open(out, "w") as f:
        json.dump(fixture, f, indent=0, sort_keys=True)
    print(f"wrote {out}: {len(fixture)} prompts")


if __name__ == "__main__":
    main()
