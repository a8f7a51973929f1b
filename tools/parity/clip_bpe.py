"""Shared by the parity scripts: CLIP's BPE vocabulary derived from OpenAI's merges file, the way
the original tokenizer derives it (256 byte symbols, the same with `</w>`, every merge, then the
start and end tokens)."""
import gzip
import json
import os

OPENAI_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> list:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_vocab_merges(bpe_gz: str, out_dir: str, n_merges: int = OPENAI_MERGES) -> tuple:
    """Writes `vocab.json` and `merges.txt` for the first `n_merges` merges; returns their paths."""
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1 : 1 + n_merges]
    symbols = bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt")
    with open(vocab_path, "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(merges_path, "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path
