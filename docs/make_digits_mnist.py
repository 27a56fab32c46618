"""Write a real-format stand-in for MNIST: scikit-learn's handwritten digits, upscaled to 28x28 with
random affine jitter, in torchvision's MNIST on-disk layout (MNIST/raw/*-idx?-ubyte).

    python docs/make_digits_mnist.py --out data/digits28 [--n-train 8000 --n-test 2000] [--val] [--hard]
    python docs/make_digits_mnist.py --out data/src --transfer --n-train 16000  # issue 37's pretraining source

Train images are drawn from core.digits_split's 80% train digits, test images from its held-out 20%,
so no test glyph is ever seen in training. --val writes a validation set instead: train and "test"
both come from the train digits, split 80/20 by source glyph (for choosing recipes without test).
--hard (issue 28): the difficulty of real handwriting from the same glyphs: a stronger affine (rotation
+-20 deg, scale 0.8-1.15, shear +-0.3, shift +-3 px), an elastic distortion (Simard et al. 2003: a
Gaussian-smoothed random displacement field, sigma 4 px, alpha 30 px) and a random stroke width (a 3x3
grey erosion, none, or a dilation). Used for issue 14's and 28's measurements (docs/research_notes.md).
--transfer (issue 37; the README's offline fine-tuning pipeline): a pretraining source for `finetune_vit.py
--dataset digits --weights RUN.pt`. Its glyphs are only those that fine-tuning trains on (core.digits_split's
train part less finetune_vit's validation split), so no target validation or test glyph, nor any image made
from one, enters pretraining; its t10k files come from 20% of those glyphs (by glyph), train from the rest.
"""
import argparse
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402


def write_idx(path, array):
    """MNIST's idx format: magic (0, 0, 0x08 = ubyte, ndim), big-endian dims, raw bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def render(images, labels, n, seed, hard=False):
    """n 28x28 uint8 images: random source glyphs, 20 px tall, rotated +-12 deg, scaled 0.9-1.1,
    shifted +-2 px, bilinear, on a black background (MNIST's polarity). hard: the module docstring's."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(labels), (n,), generator=g)
    src = F.pad(F.interpolate(images[pick], size=20, mode="bilinear", align_corners=False), (4, 4, 4, 4))
    degrees, (lo, hi), px, shear = (20, (0.8, 1.15), 3, 0.3) if hard else (12, (0.9, 1.1), 2, 0.0)
    angle = (torch.rand(n, generator=g) * 2 - 1) * np.deg2rad(degrees)
    scale = lo + (hi - lo) * torch.rand(n, generator=g)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * (px / 14)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    if hard:  # shear: x' = x + s y
        theta[:, 0, 1] += (torch.rand(n, generator=g) * 2 - 1) * shear * theta[:, 0, 0]
    grid = F.affine_grid(theta, (n, 1, 28, 28), align_corners=False)
    if hard:  # elastic: a smooth random displacement (sigma 4 px, alpha 30 px; grid units are 14 px)
        field = torch.rand(n, 2, 28, 28, generator=g) * 2 - 1
        x = torch.arange(-12, 13, dtype=torch.float32)
        kernel = torch.exp(-x ** 2 / (2 * 4.0 ** 2))
        kernel = kernel / kernel.sum()
        field = F.conv2d(field.reshape(-1, 1, 28, 28), kernel.view(1, 1, 1, -1), padding=(0, 12))
        field = F.conv2d(field, kernel.view(1, 1, -1, 1), padding=(12, 0)).view(n, 2, 28, 28)
        grid = grid + field.permute(0, 2, 3, 1) * (30 / 14)
    out = F.grid_sample(src, grid, mode="bilinear", align_corners=False).clamp(0, 1)
    if hard:  # stroke width: erode, keep or dilate (3x3 grey morphology), a third each
        width = torch.randint(0, 3, (n,), generator=g).view(n, 1, 1, 1)
        dilated, eroded = F.max_pool2d(out, 3, 1, 1), -F.max_pool2d(-out, 3, 1, 1)
        out = torch.where(width == 0, eroded, torch.where(width == 2, dilated, out))
    return (out[:, 0] * 255).round().numpy(), labels[pick].numpy()


def transfer_glyphs():
    """Indices into core.digits_split's train part that a --transfer source may render: the rows that
    finetune_vit.py --dataset digits trains on (its validation rows and the test part are left out)."""
    import finetune_vit
    n = len(core.digits_split()[0][1])
    return torch.tensor(core.validation_indices(n, finetune_vit.VAL_FRACTION["digits"])[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder that gets MNIST/raw/")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--val", action="store_true", help="test files from held-out train digits (a validation set)")
    p.add_argument("--hard", action="store_true", help="stronger affine, elastic distortion, stroke width (issue 28)")
    p.add_argument("--transfer", action="store_true",
                   help="glyphs only from finetune_vit.py --dataset digits' training rows (a pretraining source)")
    args = p.parse_args()
    if args.val and args.transfer:
        sys.exit("error: --val and --transfer both choose the glyphs; give one")
    (xtr, ytr), (xte, yte) = core.digits_split()
    if args.transfer:
        keep = transfer_glyphs()
        xtr, ytr = xtr[keep], ytr[keep]
    if args.val or args.transfer:
        order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1))
        cut = int(0.8 * len(order))
        (xtr, ytr), (xte, yte) = (xtr[order[:cut]], ytr[order[:cut]]), (xtr[order[cut:]], ytr[order[cut:]])
    raw = os.path.join(args.out, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, x, y, n, seed in (("train", xtr, ytr, args.n_train, 0), ("t10k", xte, yte, args.n_test, 1)):
        images, labels = render(x, y, n, seed, args.hard)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels)
    print(f"wrote {args.n_train} train / {args.n_test} test 28x28 digits to {raw}")


if __name__ == "__main__":
    main()
