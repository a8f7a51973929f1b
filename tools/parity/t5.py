"""Parity fixtures for the T5 encoder (LlamaGen's caption encoder; SD3's and FLUX's later):
transformers' T5EncoderModel at tiny random configs, in both feed-forward variants, and a
SentencePiece-style unigram tokenizer called the way LlamaGen calls flan-t5-xl's.

Usage: t5.py <dreambench-dir> <fixtures-dir>

Writes, for `t5_tiny` (T5 v1.1 / flan-T5: gated-GELU feed-forward, `d_kv` apart from the width)
and `t5_tiny_relu` (the original T5: ReLU feed-forward):
- `config.json` + `model.safetensors` (save_pretrained; the embedding as `shared.weight`);
- `io.safetensors`: `input_ids` [2, 24] and `attention_mask` (the second row padded after 9
  tokens), `last_hidden_state` in float32, and `last_hidden_state_bf16` from the model cast to
  bfloat16 (as float32).
And `t5_tiny/tokenizer.json` (a unigram model trained on the DreamBench prompts, Metaspace
pre-tokenizer, `</s>` appended; pad 0, eos 1, unk 2 as in T5's vocabulary) with
`t5_tiny/captions.json`: `{prompt: {input_ids, attention_mask}}` from T5TokenizerFast called as
LlamaGen's T5Embedder calls it (max_length 120, padding to max_length, truncation, special
tokens), for every DreamBench prompt, edge cases and one prompt longer than 120 tokens.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

VOCAB = 256


def prompts(dreambench: str) -> list:
    rows = open(os.path.join(dreambench, "subjects.tsv")).read().splitlines()[1:]
    classes = sorted({line.split("\t")[1] for line in rows})
    lines = open(os.path.join(dreambench, "prompts.txt")).read().splitlines()
    templates = [l.split("\t", 1)[1] for l in lines if l and not l.startswith("#")]
    return sorted({t.format("sks", c) for t in templates for c in classes})


def tokenizer(texts: list, out: str) -> T5TokenizerFast:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.9)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    assert [tok.token_to_id(t) for t in ("<pad>", "</s>", "<unk>")] == [0, 1, 2]
    path = os.path.join(out, "tokenizer.json")
    tok.save(path)
    return T5TokenizerFast(tokenizer_file=path, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


def encoder(out: str, feed_forward_proj: str, d_kv: int, seed: int) -> None:
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=d_kv, d_ff=48, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj=feed_forward_proj, dropout_rate=0.0, is_encoder_decoder=False)
    model = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    model = T5EncoderModel.from_pretrained(out).eval()
    ids = torch.randint(3, VOCAB, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    with torch.no_grad():
        last = model(input_ids=ids, attention_mask=mask).last_hidden_state
        last_bf16 = model.to(torch.bfloat16)(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    save_file({"input_ids": ids, "attention_mask": mask, "last_hidden_state": last.contiguous(),
               "last_hidden_state_bf16": last_bf16.contiguous()}, os.path.join(out, "io.safetensors"))


def main() -> None:
    dreambench, fixtures = sys.argv[1:3]
    encoder(os.path.join(fixtures, "t5_tiny"), "gated-gelu", d_kv=6, seed=0)
    encoder(os.path.join(fixtures, "t5_tiny_relu"), "relu", d_kv=8, seed=1)
    texts = prompts(dreambench)
    tok = tokenizer(texts, os.path.join(fixtures, "t5_tiny"))
    cases = texts + [
        "  a   sks dog  ",
        "A SKS Dog, on the beach!",
        "a sks dog zq",
        " ".join(texts[:12]),
    ]
    captions = {}
    for text in cases:
        enc = tok(text, max_length=120, padding="max_length", truncation=True, return_attention_mask=True,
                  add_special_tokens=True)
        captions[text] = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert any(sum(c["attention_mask"]) == 120 for c in captions.values()), "one caption is truncated"
    with open(os.path.join(fixtures, "t5_tiny", "captions.json"), "w") as f:
        json.dump(captions, f, indent=0, sort_keys=True)
    print(f"wrote t5_tiny, t5_tiny_relu and {len(captions)} captions")


if __name__ == "__main__":
    main()
