"""Parity fixture for the CLIP tokenizer: transformers' CLIPTokenizer on the DreamBench prompts.

Usage: clip_tokenizer.py <bpe_simple_vocab_16e6.txt.gz> <dreambench-dir> <fixture-out.json>

Builds the tokenizer's `vocab.json`/`merges.txt` from OpenAI's merges file (the derivation the
original tokenizer uses), tokenises every DreamBench prompt template with the identifier `sks` and
every class noun, plus edge cases, with transformers, and writes `{prompt: ids}` (start and end
tokens included, no padding). The Rust test compares its own tokenizer against this file.
"""
import gzip
import json
import os
import sys
import tempfile

from transformers import CLIPTokenizer


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def main() -> None:
    bpe, dreambench, out = sys.argv[1:4]
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"))
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
