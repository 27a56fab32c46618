"""DFM object detection on PASCAL VOC 2007 (paper Sections 3.1.1, 5.1, A.1.2, A.3.3-A.3.4, D.1).

Result (offline minivoc quickstart, 2-core CPU, 240 test canvases, seeds 0-2, choices made on the
validation split): fm map50 0.661 (0.649-0.669), bp 0.713 (0.700-0.723), 0.926x; 12-20 min per run.
    python train_det_voc.py --dataset minivoc [--method bp] --out runs/det_fm.pt

Setup (D.1): ResNet-50 with ImageNet weights, a 1x1 conv to d = 128 and a 2-D sine position code make
the image memory. M = 20 slots; slot j's target z1_j = W_class[c_j] + W_box b_j (cxcywh in [0, 1];
empty slots: background C, zero box). T flow blocks (transformer decoder layers, LayerNorm only, 4
heads, conditioned on t) predict all M slots; shared linear class and box heads decode any latent.
Block k's loss: DETR's Hungarian loss of the decoded z1_hat (class 1, L1 5, GIoU 2; no-object weight
0.1) + 0.1 x flow MSE. 256 px, 50 epochs, batch 16, AdamW wd 1e-4, lr 1e-4 (blocks) / 1e-5
(backbone), x0.1 at epoch 20, clipping 1.0. Inference: Euler over T steps, scores >= 0.05, per-class
NMS, VOC07 11-point mAP@0.5 with the devkit's rules.

--recipe dfm (default) / paper: the flow formulation. 'paper' is the literal reading (objects in
annotation order, per-block slot queries, velocity output, the straight-line path, z0 ~ N(0, I), Euler
from a noise draw; map50 0.036 on minivoc's validation split against 0.663). 'dfm': --coupling match
(each object goes to the slot whose own prediction Hungarian-matches it), --queries shared, --predict
refine (the block corrects c_skip(t) z_t, the least-squares guess of z1), --train-path euler (block k
trains on the Euler state blocks 0..k-1 reach at t = k/T, where inference uses it), --z0-std 0.1,
--z0-infer mean (Euler from z0 = 0). Match and refine need the Euler path.

Other departures from D.1 (the paper's reading in brackets): the collapse guard (--no-guard); a 0.5
horizontal flip (--hflip 0); under --recipe paper each block's own slot embedding (--queries none).
Images with more than M objects keep the first M as flow targets; the Hungarian loss matches among
all, and L1 / GIoU are divided by every box of the batch, as DETR's. --method bp: the same backbone
and a T-layer DETR decoder (learned queries, same width), the matching loss after every layer.

minivoc (not a paper setup): scikit-learn's digits pasted on cluttered canvases, written once in the
real VOC layout under --data and read by the same loader. CPU defaults: --backbone tiny (3 conv stages,
stride 8) pretrained once on digit classification (train digits only; cached under --data), 64 px,
M = 10, batch 8, lr 5e-4 everywhere, 40 epochs (drop at 32), parallel schedule, no flip (a mirrored
digit is another glyph) but --crop 0.6, a random crop that keeps every box. docs/research_notes.md.
"""
import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from scipy.optimize import linear_sum_assignment
from timm.layers import freeze_batch_norm_2d
from torchvision import tv_tensors
from torchvision.ops import batched_nms, box_convert, generalized_box_iou
from torchvision.transforms import v2
from tqdm import tqdm

import core

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # input normalisation (D.1)


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("DFM object detection on PASCAL VOC", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--dataset", default="voc2007", choices=["voc2007", "minivoc"],
                   help="VOC 2007 (trainval / test), or the offline digits-on-canvas set in VOC format")
    p.add_argument("--data", default="data", help="root holding VOCdevkit/ (downloaded / written there)")
    p.add_argument("--workers", type=int, default=None, help="data loader workers (VOC 2; minivoc 0)")
    p.add_argument("--hflip", type=float, default=None, help="training horizontal flip probability (VOC 0.5; minivoc 0)")
    p.add_argument("--crop", type=float, default=None,
                   help="random crop keeping every box, sides in [CROP, 1] of the image (0 = off, VOC; minivoc 0.6)")
    # method
    p.add_argument("--method", default="fm", choices=["fm", "bp"], help="flow matching, or the DETR-style baseline")
    p.add_argument("--recipe", default="dfm", choices=sorted(RECIPES),
                   help="fm's flow formulation (RECIPES): this project's or the paper's; each part has its own flag")
    p.add_argument("--mode", default=None, choices=["parallel", "sequential"],
                   help="schedule: Algorithm 1 (a full pass per block) or every batch trains all blocks")
    p.add_argument("--train-path", default=None, choices=["line", "euler"],
                   help="block k trains at z_t on the straight line at sampled t (paper), or at the Euler state "
                        "blocks 0..k-1 reach at t = k/T (inference's path; no gradient crosses blocks)")
    p.add_argument("--z0-infer", default=None, choices=["noise", "mean"],
                   help="inference from a noise draw z0 (paper) or from z0 = 0; fm logs the other as map50_noise/mean")
    p.add_argument("--flow-weight", type=float, default=0.1, help="weight of the flow MSE (paper 0.1)")
    p.add_argument("--no-aux-loss", dest="aux_loss", action="store_false",
                   help="bp: only the last decoder layer's matching loss (default: after every layer, as DETR)")
    # model: a --resume must match these (and --dataset, --method, --final): RESUME_MATCH
    arch = p.add_argument_group("model")
    arch.add_argument("--T", type=int, default=4, help="flow blocks (bp: decoder layers)")
    arch.add_argument("--img-size", type=int, default=None, help="square input size (paper 256; minivoc 64)")
    arch.add_argument("--coupling", default=None, choices=["index", "match"],
                      help="objects to slots: annotation order, or (Euler path) the slot whose own prediction "
                           "Hungarian-matches the object, slot targets the set loss then uses")
    arch.add_argument("--predict", default=None, choices=["velocity", "refine"],
                      help="block output: the velocity (paper), or refine: a correction f of the guess c_skip(t) z_t "
                           "that the block reads, z1_hat = c_skip(t) z_t + f (FlowDetector.skip)")
    arch.add_argument("--queries", default=None, choices=["block", "shared", "none"],
                      help="slot queries added to each block's input: its own, one N(0, 1) set for all (DETR's), or none")
    arch.add_argument("--z0-std", type=float, default=None, help="std of the noise z0 (paper and VOC: 1; minivoc 0.1)")
    arch.add_argument("--no-guard", action="store_true", help="let the flow MSE move the target embeddings")
    arch.add_argument("--backbone", default=None, choices=["resnet18", "resnet34", "resnet50", "tiny"],
                      help="torchvision ResNet, or tiny: a small CNN for CPU runs")
    arch.add_argument("--frozen-bn", action="store_true",
                      help="backbone BatchNorm frozen (DETR's FrozenBatchNorm2d; small batches; torchrun N x b then "
                           "trains as one process at N b); default: batch statistics, as the measured recipes")
    arch.add_argument("--stride", type=int, default=None, choices=[8, 16, 32],
                      help="memory from layer4 (32, paper), layer3 (16) or layer2 (8, minivoc)")
    arch.add_argument("--dim", type=int, default=128, help="d: memory and slot width")
    arch.add_argument("--slots", type=int, default=None, help="M query slots (paper 20; minivoc 10)")
    arch.add_argument("--nheads", type=int, default=4, help="attention heads")
    arch.add_argument("--ffn", type=int, default=512, help="FFN width of each block")
    # weights of the backbone, optimisation, inference
    p.add_argument("--weights", default=None, help="local state dict of the backbone (a torchvision ResNet's, tiny's)")
    p.add_argument("--no-pretrained", action="store_true", help="random init (not ImageNet's; tiny: not its digits)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in the blocks")
    p.add_argument("--epochs", type=int, default=None, help="epochs (paper 50; minivoc 40, lr drop at 32)")
    p.add_argument("--bs", type=int, default=None, help="batch size per process (paper 16; minivoc 8)")
    p.add_argument("--lr", type=float, default=None, help="lr of the blocks, heads and embeddings (paper 1e-4)")
    p.add_argument("--lr-backbone", type=float, default=None, help="backbone lr (paper 1e-5; minivoc: --lr)")
    p.add_argument("--lr-drop", type=int, default=None, help="epoch at which both lrs are multiplied by 0.1")
    p.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping max norm")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone and heads (bp: the model)")
    p.add_argument("--score-thresh", type=float, default=0.05, help="keep detections with score >= this")
    p.add_argument("--nms", type=float, default=0.5, help="per-class NMS IoU threshold")
    # run
    p.add_argument("--seed", type=int, default=0, help="random seed (also seeds evaluation noise)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--out", default="run.pt", help="checkpoint path; the JSON-lines log goes beside it")
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument("--max-steps", type=int, default=0, help="stop each pass after this many steps (smoke tests)")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N validation / test images only")
    p.add_argument("--final", action="store_true", help="train on trainval and report test (no val_ metrics)")
    p.add_argument("--test-every-epoch", action="store_true", help="test every epoch (curves), not after the last only")
    # the default dataset's setup and recipe; parse_args applies those the command line asks for
    p.set_defaults(**SETUPS["voc2007"], **RECIPES["dfm"])
    return p


# per dataset: the paper's D.1 setup on VOC; minivoc is a CPU quickstart (module docstring)
SETUPS = {
    "voc2007": dict(backbone="resnet50", img_size=256, stride=32, slots=20, bs=16, lr=1e-4, lr_backbone=1e-5,
                    epochs=50, lr_drop=20, mode="sequential", workers=2, hflip=0.5, crop=0.0),
    "minivoc": dict(backbone="tiny", img_size=64, stride=8, slots=10, bs=8, lr=5e-4, lr_backbone=None,
                    epochs=40, lr_drop=32, mode="parallel", workers=0, hflip=0.0, crop=0.6),
}
# --recipe: fm's flow formulation: 'paper', the literal reading of Sections 3.1.1 / A.1.2, and 'dfm', this project's
RECIPES = {
    "paper": dict(coupling="index", queries="block", predict="velocity", train_path="line", z0_std=1.0, z0_infer="noise"),
    "dfm": dict(coupling="match", queries="shared", predict="refine", train_path="euler", z0_std=0.1, z0_infer="mean"),
}


def parse_args(argv=None):
    """Flags with the --dataset setup, the --recipe (bp: parallel) and, where the setup has no backbone lr, --lr's
    value as real argparse defaults (read in two first passes); a flag the user typed always wins."""
    first, _ = get_args_parser(add_help=False).parse_known_args(argv)
    defaults = dict(SETUPS[first.dataset], **RECIPES[first.recipe])
    if first.method == "bp":
        defaults["mode"] = "parallel"
    second = get_args_parser(add_help=False)
    second.set_defaults(**defaults)
    known, _ = second.parse_known_args(argv)
    if defaults["lr_backbone"] is None:
        defaults["lr_backbone"] = known.lr
    parser = get_args_parser()
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.backbone == "tiny" and args.dataset != "minivoc":  # its only pretraining is on digits
        args.no_pretrained = True
    return args


# the flags a --resume must match: the parser's model group, and what the data and the method are
RESUME_MATCH = ("dataset", "method", "final") + tuple(
    a.dest for g in get_args_parser()._action_groups if g.title == "model" for a in g._group_actions)


# ---- Evaluation: PASCAL VOC mAP, devkit rules ----------------------------------------------------
def _np(x):
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def voc_ap(rec, prec, use_07_metric=True):
    """VOC07 11-point AP, or the area under the monotone precision envelope."""
    if use_07_metric:
        return float(np.mean([prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in np.arange(0, 1.1, 0.1)]))
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def voc_eval(dets, gts, num_classes, iou_thresh=0.5, use_07_metric=True):
    """PASCAL VOC AP per class with the devkit's rules. dets[i]: dict(boxes [N, 4] xyxy pixels, scores, labels);
    gts[i]: dict(boxes, labels, difficult). Per class, detections in descending score order each match the
    highest-IoU ground truth of their image (the devkit's +1 pixel IoU); above iou_thresh a difficult box makes
    neither TP nor FP, an unmatched one a TP, a matched one an FP; below, FP. Returns {"map": the mean over classes
    with a non-difficult ground truth, "ap": per class, nan without one}."""
    aps = []
    for c in range(num_classes):
        keep = [_np(g["labels"]) == c for g in gts]
        gt_boxes = [_np(g["boxes"]).reshape(-1, 4)[k].astype(np.float64) for g, k in zip(gts, keep)]
        gt_diff = [_np(g["difficult"]).astype(bool)[k] for g, k in zip(gts, keep)]
        used, npos = [np.zeros(len(b), bool) for b in gt_boxes], sum(int((~d).sum()) for d in gt_diff)
        image_ids, scores, boxes = [], [], []
        for i, d in enumerate(dets):
            keep = _np(d["labels"]) == c
            image_ids += [i] * int(keep.sum())
            scores.append(_np(d["scores"]).reshape(-1)[keep])
            boxes.append(_np(d["boxes"]).reshape(-1, 4)[keep])
        if npos == 0:
            aps.append(float("nan"))
            continue
        scores = np.concatenate(scores) if scores else np.zeros(0)
        boxes = np.concatenate(boxes).astype(np.float64) if boxes else np.zeros((0, 4))
        order = np.argsort(-scores, kind="stable")
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        for rank, j in enumerate(order):
            i, bb = image_ids[j], boxes[j]
            gt = gt_boxes[i]
            if len(gt) == 0:
                fp[rank] = 1
                continue
            iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
            inter = iw * ih
            union = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                     + (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0) - inter)
            overlaps = inter / union
            best = int(np.argmax(overlaps))
            if overlaps[best] > iou_thresh and gt_diff[i][best]:
                continue  # matched a difficult box: neither TP nor FP
            if overlaps[best] > iou_thresh and not used[i][best]:
                tp[rank], used[i][best] = 1, True
            else:
                fp[rank] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps.append(voc_ap(rec, prec, use_07_metric))
    valid = [a for a in aps if not np.isnan(a)]
    return {"map": float(np.mean(valid)) if valid else 0.0, "ap": aps}


# ---- Data ----------------------------------------------------------------------------------------
MINIVOC_VERSION = "minivoc 2: 64-96 px canvases, 1-5 digits of 12-40 px"


def cluttered_canvas(rng, h, w, strokes, length):
    """minivoc's clutter: an h x w canvas (float 0-255) of noise N(40, 20) and rng.integers(*strokes) strokes."""
    canvas = rng.normal(40, 20, (h, w)).clip(0, 255)
    for _ in range(int(rng.integers(*strokes))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        n, horizontal = int(rng.integers(*length)), rng.random() < 0.5  # a horizontal or vertical stroke
        canvas[(y0, slice(x0, x0 + n)) if horizontal else (slice(y0, y0 + n), x0)] = rng.integers(100, 200)
    return canvas


def digit_patch(image, size):
    """A scikit-learn digit ([1, 8, 8] in [0, 1]) resized to size x size pixels, float 0-255."""
    return np.asarray(Image.fromarray((image[0].numpy() * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR),
                      dtype=np.float64)


def xml_fields(parent, **fields):
    for tag, value in fields.items():
        ET.SubElement(parent, tag).text = str(value)


def write_minivoc(root, n_train=960, n_test=240, seed=0):
    """Write minivoc once under root/VOCdevkit/VOC2007 in the real VOC layout (JPEGImages, Annotations with
    1-based pixel boxes, ImageSets/Main/{trainval,test}.txt). Each 64-96 px canvas (grey noise and strokes)
    holds 1-5 scikit-learn digits pasted at 12-40 px (test canvases: the held-out digits); under 16 px is
    difficult, cut by the border truncated (box clipped). A MINIVOC file records the version; a VOC2007 folder
    without it (real VOC, an older minivoc) is never touched: core.DataError instead."""
    final, marker = os.path.join(root, "VOCdevkit", "VOC2007"), os.path.join(root, "VOCdevkit", "VOC2007", "MINIVOC")
    if os.path.isfile(marker) and open(marker).read().strip() == MINIVOC_VERSION:
        return final
    if os.path.exists(final):
        raise core.DataError(f"{os.path.abspath(final)} holds another dataset than {MINIVOC_VERSION!r} (real VOC or "
                             f"an older minivoc); pass another --data, or delete it to have minivoc written there")
    # written into a private folder and renamed into place whole (under prepare_data's lock): no half-written folder
    os.makedirs(os.path.dirname(final), exist_ok=True)
    base = tempfile.mkdtemp(prefix=".VOC2007-partial-", dir=os.path.dirname(final))
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    rng, splits = np.random.default_rng(seed), core.digits_split()
    for split, (images, labels), count, offset in (("trainval", splits[0], n_train, 0), ("test", splits[1], n_test, n_train)):
        ids = []
        for n in range(count):
            name = f"{offset + n:06d}"
            w, h = (int(v) for v in rng.integers(64, 97, size=2))
            canvas = cluttered_canvas(rng, h, w, strokes=(2, 6), length=(5, 30))
            objects = []
            for _ in range(int(rng.integers(1, 6))):
                j = int(rng.integers(len(labels)))
                size = int(rng.integers(12, 41))
                digit = digit_patch(images[j], size)
                x0 = int(rng.integers(-size // 3, w - 2 * size // 3))
                y0 = int(rng.integers(-size // 3, h - 2 * size // 3))
                xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + size, w), min(y0 + size, h)
                if xb - xa < 4 or yb - ya < 4:
                    continue
                patch = digit[ya - y0:yb - y0, xa - x0:xb - x0]
                canvas[ya:yb, xa:xb] = np.maximum(canvas[ya:yb, xa:xb], patch)
                truncated = int((xa, ya, xb, yb) != (x0, y0, x0 + size, y0 + size))
                objects.append((DIGIT_CLASSES[int(labels[j])], int(size < 16), truncated, xa + 1, ya + 1, xb, yb))
            Image.fromarray(canvas.astype(np.uint8)).convert("RGB").save(os.path.join(base, "JPEGImages", name + ".jpg"),
                                                                         quality=95)
            ann = ET.Element("annotation")
            xml_fields(ann, folder="VOC2007", filename=name + ".jpg")
            xml_fields(ET.SubElement(ann, "size"), width=w, height=h, depth=3)
            for cls, difficult, truncated, *box in objects:
                obj = ET.SubElement(ann, "object")
                xml_fields(obj, name=cls, pose="Unspecified", truncated=truncated, difficult=difficult)
                xml_fields(ET.SubElement(obj, "bndbox"), **dict(zip(("xmin", "ymin", "xmax", "ymax"), box)))
            ET.ElementTree(ann).write(os.path.join(base, "Annotations", name + ".xml"))
            ids.append(name)
        with open(os.path.join(base, "ImageSets", "Main", split + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    with open(os.path.join(base, "MINIVOC"), "w") as f:
        f.write(MINIVOC_VERSION + "\n")
    os.rename(base, final)
    return final


def check_voc_folder(root, image_set, minivoc):
    """core.DataError naming the path and the fix when root/VOCdevkit/VOC2007 is not the dataset the flags ask
    for, lacks the image set's list, lists no image, or lists an image or annotation that is absent."""
    base = os.path.join(os.path.abspath(root), "VOCdevkit", "VOC2007")
    hint = (f"delete {base} to have minivoc written again" if minivoc else
            f"extract VOCtrainval_06-Nov-2007.tar (train, val, trainval) and VOCtest_06-Nov-2007.tar (test) under "
            f"{os.path.abspath(root)}")
    if not minivoc and os.path.isfile(os.path.join(base, "MINIVOC")):
        raise core.DataError(f"{base} holds minivoc (written by --dataset minivoc), not VOC 2007: add --dataset "
                             f"minivoc, or pass --data DIR with VOC 2007 in DIR/VOCdevkit/VOC2007")
    listing = os.path.join(base, "ImageSets", "Main", image_set + ".txt")
    if not os.path.isfile(listing):
        raise core.DataError(f"{listing} is missing (a partly extracted dataset?): {hint}")
    with open(listing) as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise core.DataError(f"{listing} lists no image: {hint}")
    for name in ids:
        for path in (os.path.join(base, "JPEGImages", name + ".jpg"), os.path.join(base, "Annotations", name + ".xml")):
            if not os.path.isfile(path):
                raise core.DataError(f"{path} is listed in {listing} but absent: {hint}")


class VOCData(torch.utils.data.Dataset):
    """torchvision VOCDetection (2007) as (image, target, index), target = dict(boxes [G, 4] xyxy in 1-based VOC
    pixels, labels, difficult, size (H, W)); a malformed annotation raises core.DataError naming the file."""

    def __init__(self, root, image_set, classes, transform, download=False, indices=None):
        try:
            self.voc = torchvision.datasets.VOCDetection(root, year="2007", image_set=image_set)
        except RuntimeError:  # absent: downloaded where allowed (VOC 2007); without download it fails again
            try:
                self.voc = torchvision.datasets.VOCDetection(root, year="2007", image_set=image_set, download=download)
            except Exception as e:
                raise core.DataError(f"VOC2007 {image_set} not found under {os.path.abspath(root)}/VOCdevkit/VOC2007 "
                                     f"({type(e).__name__}); extract VOCtrainval_06-Nov-2007.tar and "
                                     f"VOCtest_06-Nov-2007.tar under {os.path.abspath(root)}") from None
        self.classes, self.transform = classes, transform
        # indices: the images of the image set this dataset holds (a validation carve-out), all when None
        self.ids = list(range(len(self.voc))) if indices is None else list(indices)
        self.parsed = {}  # index -> annotation, each XML file parsed once

    def __len__(self):
        return len(self.ids)

    def annotation(self, i):
        """dict(boxes, labels, difficult) of image i (a new dict each call; the tensors are shared)."""
        if i not in self.parsed:
            self.parsed[i] = self.parse(self.voc.annotations[self.ids[i]])
        return dict(self.parsed[i])

    def parse(self, path):
        try:
            objects = self.voc.parse_voc_xml(ET.parse(path).getroot())["annotation"].get("object", [])
            boxes, labels, difficult = [], [], []
            for obj in objects if isinstance(objects, list) else [objects]:
                b = obj["bndbox"]
                box = [float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
                if box[2] <= box[0] or box[3] <= box[1]:
                    raise ValueError(f"box {box} has xmax <= xmin or ymax <= ymin")
                if obj["name"] not in self.classes:
                    raise ValueError(f"unknown class {obj['name']!r}")
                boxes.append(box)
                labels.append(self.classes.index(obj["name"]))
                difficult.append(int(obj.get("difficult", 0)) == 1)
        except (ET.ParseError, KeyError, ValueError, TypeError) as e:
            raise core.DataError(f"malformed annotation {path}: {e}") from None
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels),
                "difficult": torch.tensor(difficult, dtype=torch.bool)}

    def __getitem__(self, i):
        target = self.annotation(i)
        path = self.voc.images[self.ids[i]]
        try:
            with Image.open(path) as im:
                image = v2.functional.pil_to_tensor(im.convert("RGB"))
        except OSError as e:  # missing, truncated or not an image
            raise core.DataError(f"unreadable image {path}: {str(e).splitlines()[0]}") from None
        h, w = image.shape[-2:]
        target["size"] = torch.tensor([h, w])
        # VOC boxes are 1-based inclusive pixels; the model works on 0-based continuous coordinates
        boxes = tv_tensors.BoundingBoxes(target["boxes"] - torch.tensor([1.0, 1.0, 0.0, 0.0]), format="XYXY",
                                         canvas_size=(h, w))
        image, boxes = self.transform(tv_tensors.Image(image), boxes)
        target["boxes_norm"] = box_convert(boxes.as_subclass(torch.Tensor), "xyxy", "cxcywh") / image.shape[-1]
        return image, target, i


class CropKeepingBoxes(v2.Transform):
    """Random crop that keeps every box whole: each side a uniform fraction in [S, 1] of the image (at least the
    boxes' span), at a uniform position that keeps them all inside."""

    def __init__(self, min_side):
        super().__init__()
        self.min_side = min_side

    def make_params(self, flat_inputs):
        h, w = v2.functional.get_size(next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)))
        boxes = [x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)]
        boxes = boxes[0].as_subclass(torch.Tensor) if boxes and len(boxes[0]) else None
        params = {}
        for name, size, lo, hi in (("left", w, 0, 2), ("top", h, 1, 3)):
            first, last = (size, 0) if boxes is None else (math.floor(boxes[:, lo].min()), math.ceil(boxes[:, hi].max()))
            side = int(torch.randint(max(last - first, math.ceil(self.min_side * size)), size + 1, ()).item())
            start_lo, start_hi = max(0, last - side), min(first, size - side)
            params[name] = int(torch.randint(start_lo, start_hi + 1, ()).item())
            params["width" if name == "left" else "height"] = side
        return params

    def transform(self, inpt, params):
        return self._call_kernel(v2.functional.crop, inpt, **params)


def build_data(args):
    """(train, val, test, classes). Validation: VOC 2007's val set (training on train), or minivoc's 20% of
    trainval carved with a fixed seed, read with the test transform; --final: train on trainval, val None."""
    classes = DIGIT_CLASSES if args.dataset == "minivoc" else VOC_CLASSES
    if args.dataset == "minivoc":
        write_minivoc(args.data)
    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    size = (args.img_size, args.img_size)
    flip = v2.RandomHorizontalFlip(args.hflip)
    crop = [CropKeepingBoxes(args.crop)] if args.crop else []
    train_tf = v2.Compose([flip] + crop + [v2.Resize(size, antialias=True)] + norm)
    test_tf = v2.Compose([v2.Resize(size, antialias=True)] + norm)
    download, final = args.dataset == "voc2007", args.final
    if args.dataset == "minivoc" or os.path.isdir(os.path.join(args.data, "VOCdevkit", "VOC2007")):
        for image_set in ("trainval", "test") if final or args.dataset == "minivoc" else ("train", "val", "test"):
            check_voc_folder(args.data, image_set, args.dataset == "minivoc")
    if final or args.dataset == "voc2007":
        train = VOCData(args.data, "trainval" if final else "train", classes, train_tf, download)
        val = None if final else VOCData(args.data, "val", classes, test_tf, download)
    else:
        keep, held = core.validation_indices(len(VOCData(args.data, "trainval", classes, None)), 0.2)
        train = VOCData(args.data, "trainval", classes, train_tf, indices=keep)
        val = VOCData(args.data, "trainval", classes, test_tf, indices=held)
    test = VOCData(args.data, "test", classes, test_tf, download)
    return core.Seeded(train, args.seed), val, test, classes  # Seeded: flips and crops drawn per (seed, epoch, image)


def collate(batch):
    images, targets, index = zip(*batch)
    return torch.stack(images), list(targets), torch.tensor(index)


# ---- Model ---------------------------------------------------------------------------------------
def build_tiny(stride):
    """A small CNN for CPU quickstarts: log2(stride) stages of 3x3 conv (stride 2, 32/64/128/256/256), BN, ReLU."""
    layers, c_in = [], 3
    for c in [32, 64, 128, 256, 256][:int(math.log2(stride))]:
        layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        c_in = c
    return nn.Sequential(*layers), c_in


def pretrain_tiny(path, stride, samples=24000, epochs=8, size=32, bs=128, lr=2e-3, seed=0):
    """minivoc's stand-in for ImageNet weights: the tiny trunk + pooling + a linear layer classify single *train*
    digits (minivoc's test canvases use the held-out ones) pasted at 8-28 px on 32 px canvases with minivoc's
    clutter; AdamW, one-cycle lr; the trunk's state dict is saved atomically to `path`. Seeded, isolated from the
    caller's RNG and on one thread, so every machine with the same torch build and CPU kind gets the same trunk.
    Returns the accuracy on 2000 fresh canvases of the train digits."""
    (images, labels), _ = core.digits_split()
    rng = np.random.default_rng(seed)

    def render(n):
        x, y = np.zeros((n, size, size), np.float32), np.zeros(n, np.int64)
        for i in range(n):
            canvas = cluttered_canvas(rng, size, size, strokes=(0, 3), length=(3, 15))
            j, s = int(rng.integers(len(labels))), int(rng.integers(size // 4, size * 7 // 8 + 1))
            x0, y0 = (int(v) for v in rng.integers(0, size - s + 1, size=2))
            canvas[y0:y0 + s, x0:x0 + s] = np.maximum(canvas[y0:y0 + s, x0:x0 + s], digit_patch(images[j], s))
            x[i], y[i] = canvas, labels[j]
        x = torch.from_numpy(x / 255.0)[:, None].expand(-1, 3, -1, -1)
        return v2.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD), torch.from_numpy(y)

    (x, y), (x_val, y_val), threads = render(samples), render(2000), torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_num_threads(1)  # a multi-threaded conv sums in another order: the trunk would depend on the machine
        trunk, channels = build_tiny(stride)
        net = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10))
        optimizer, steps = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-4), samples // bs
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps)
        for _ in tqdm(range(epochs), desc="pretraining the tiny backbone on digits", leave=False):
            net.train()
            order = torch.randperm(samples)
            for b in range(steps):
                i = order[b * bs:(b + 1) * bs]
                loss = F.cross_entropy(net(x[i]), y[i])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
        net.eval()
        with torch.no_grad():
            accuracy = (net(x_val).argmax(1) == y_val).float().mean().item()
        torch.set_num_threads(threads)
    core.save_checkpoint(trunk.state_dict(), path)
    return accuracy


def tiny_weights(args):
    """The digits-pretrained tiny trunk, written once under --data by pretrain_tiny (as a download is cached)."""
    path = os.path.join(args.data, f"tiny_digits_stride{args.stride}.pth")
    if not os.path.isfile(path):
        accuracy = pretrain_tiny(path, args.stride)
        print(f"tiny backbone pretrained on digit classification (train digits only): accuracy {accuracy:.3f} on "
              f"fresh canvases -> {path}")
    return path


def build_resnet(name, weights_file=None, pretrained=True, stride=32):
    """torchvision ResNet trunk (or build_tiny's) with ImageNet weights, a local state dict (--weights) or random
    init, up to layer4 (stride 32, the paper), layer3 (16) or layer2 (8)."""
    if name == "tiny":
        trunk, channels = build_tiny(stride)
        if weights_file:
            core.load_weights(trunk, weights_file, f"tiny (stride {stride})", skip=("fc.",))
        return trunk, channels
    net = getattr(torchvision.models, name)(weights=None)
    if weights_file:
        core.load_weights(net, weights_file, name, skip=("fc.",))
    elif pretrained:
        enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            net.load_state_dict(enum.get_state_dict(progress=False))
        except Exception as e:
            raise core.WeightsError(f"cannot get ImageNet weights for {name} ({type(e).__name__}: offline?); pass "
                               f"--weights FILE (a torchvision state dict) or --no-pretrained") from None
    drop = {32: 0, 16: 1, 8: 2}[stride]  # layers dropped from the end: layer4, then layer3
    return nn.Sequential(*list(net.children())[:-2 - drop]), net.fc.in_features // 2 ** drop


def sine_position(h, w, dim, device):
    """DETR's 2-D sine encoding (half the channels y, half x) of an h x w grid's centres, row-major: [h * w, dim]."""
    ys, xs = ((torch.arange(n, device=device).float() + 0.5) / n for n in (h, w))
    xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, device=device) / quarter))
    ay, ax = (xy[:, 1:2] * 2 * torch.pi * freqs), (xy[:, 0:1] * 2 * torch.pi * freqs)
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], -1)


class ImageMemory(nn.Module):
    """ResNet trunk -> 1x1 conv to d -> [B, HW, d] memory with the sine position added."""

    def __init__(self, name, dim, weights_file=None, pretrained=True, stride=32, frozen_bn=False):
        super().__init__()
        self.trunk, channels = build_resnet(name, weights_file, pretrained, stride)
        if frozen_bn:  # DETR's FrozenBatchNorm2d: the weights' statistics, nothing trained
            self.trunk = freeze_batch_norm_2d(self.trunk)
        self.proj = nn.Conv2d(channels, dim, 1)

    def forward(self, x):
        f = self.proj(self.trunk(x))  # [B, d, H/32, W/32]
        b, d, h, w = f.shape
        return [f.flatten(2).transpose(1, 2) + sine_position(h, w, d, f.device)[None]]


class FlowBlock(nn.Module):
    """v_k for M slots: a pre-norm transformer decoder layer on z_t + e_t + slot query, then a linear map.
    z [B, M, d], memory [B, N, d], t [B], query [M, d]: the detector's shared queries (None: own only)."""

    def __init__(self, dim, slots, nheads, ffn, dropout, own_query=True):
        super().__init__()
        self.time = core.TimeEmbedding(dim)
        self.slot = nn.Parameter(torch.randn(slots, dim) * 0.02) if own_query else None
        self.layer = nn.TransformerDecoderLayer(dim, nheads, ffn, dropout, batch_first=True, norm_first=True)
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, z, memory, t, query=None):
        if self.slot is not None:  # its own slot embedding, plus the detector's query if there is one
            query = self.slot if query is None else self.slot + query
        h = z + self.time(t)[:, None]  # [B, M, d]
        return self.out(self.layer(h if query is None else h + query.expand_as(z), memory))


class FlowDetector(nn.Module):
    """Backbone memory + T flow blocks + targets (W_class, W_box) + shared decoders; queries: [M, d] or None."""

    def __init__(self, memory, blocks, num_classes, dim, guard=True, queries=None, predict="velocity", z0_std=1.0):
        super().__init__()
        self.backbone, self.heads = memory, nn.ModuleList(blocks)
        self.w_class = nn.Embedding(num_classes + 1, dim)  # index C = background
        self.w_box = nn.Linear(4, dim, bias=False)
        self.class_head, self.box_head = nn.Linear(dim, num_classes + 1), nn.Linear(dim, 4)
        self.queries, self.predict = queries, predict
        self.num_classes, self.dim, self.guard = num_classes, dim, guard
        self.z0_std = z0_std  # s0: z0 ~ N(0, s0^2 I) (noise), and c_skip of --predict refine

    @property
    def T(self):
        return len(self.heads)

    def targets(self, classes, boxes):
        """z1_j = W_class[c_j] + W_box b_j (eq. 2). classes [B, M], boxes [B, M, 4] -> [B, M, d]."""
        return self.w_class(classes) + self.w_box(boxes)

    def noise(self, draw):
        """z0 = s0 * draw (s0 = --z0-std) for a N(0, I) draw [B, M, d]: the one place z0 is scaled."""
        return draw * self.z0_std

    def decode(self, z):
        """Class logits [B, M, C + 1] and sigmoid cxcywh boxes [B, M, 4] of any latent."""
        return core.at_least_fp32(self.class_head(z)), core.at_least_fp32(self.box_head(z)).sigmoid()

    def velocity(self, k, z, feats, t):
        """v_k(z_t, t): the block's output, or (refine) v = (z1_hat - z_t) / (1 - t) with z1_hat = c_skip(t) z_t + f,
        f the block's output on the guess c_skip(t) z_t."""
        if self.predict == "velocity":
            return self.heads[k](z, feats[0], t, self.queries)
        guess = self.skip(t) * z
        return (guess + self.heads[k](guess, feats[0], t, self.queries) - z) / (1 - t).view(-1, 1, 1)

    def skip(self, t):
        """--predict refine: EDM's c_skip(t) [B, 1, 1] (Karras et al. 2022) for z0 ~ N(0, s0^2), unit-variance
        targets: c_skip z_t is the least-squares estimate of z1 (0 at t = 0), so a block refines the running
        estimate, as a residual layer of bp's decoder. No c_out: it is sized for the z0 noise, not for the error
        of earlier blocks a block corrects on the Euler path."""
        t = t.view(-1, 1, 1).float()
        return t / (t ** 2 + (1 - t) ** 2 * self.z0_std ** 2)

    def head(self, k):
        """Block k as head(z_t, memory, t) -> v, the signature of core.flow_matching_loss."""
        return lambda z, memory, t: self.velocity(k, z, [memory], t)


class DETRBaseline(nn.Module):
    """bp: the same memory, learned queries and T decoder layers of the same width, end to end."""

    def __init__(self, memory, num_classes, dim, slots, nheads, ffn, dropout, T):
        super().__init__()
        self.backbone, self.queries = memory, nn.Parameter(torch.randn(slots, dim) * 0.02)
        self.layers = nn.ModuleList(nn.TransformerDecoderLayer(dim, nheads, ffn, dropout, batch_first=True,
                                                               norm_first=True) for _ in range(T))
        self.norm, self.num_classes = nn.LayerNorm(dim), num_classes
        self.class_head, self.box_head = nn.Linear(dim, num_classes + 1), nn.Linear(dim, 4)

    def decode(self, h):
        h = self.norm(h)
        return core.at_least_fp32(self.class_head(h)), core.at_least_fp32(self.box_head(h)).sigmoid()

    def forward(self, x, every_layer=False):
        """(logits, boxes) of the last layer, or with every_layer after each layer (DETR's auxiliary losses)."""
        memory = self.backbone(x)[0]
        h = self.queries[None].expand(x.shape[0], -1, -1)
        outs = []
        for layer in self.layers:
            h = layer(h, memory)
            if every_layer:
                outs.append(self.decode(h))
        return outs if every_layer else self.decode(h)


def build_model(args, num_classes):
    """The model of this script for `args` (analyze.py rebuilds checkpoints through this)."""
    memory = ImageMemory(args.backbone, args.dim, args.weights, not args.no_pretrained, args.stride, args.frozen_bn)
    if args.method == "bp":
        return DETRBaseline(memory, num_classes, args.dim, args.slots, args.nheads, args.ffn, args.dropout, args.T)
    blocks = [FlowBlock(args.dim, args.slots, args.nheads, args.ffn, args.dropout, own_query=args.queries == "block")
              for _ in range(args.T)]
    queries = nn.Parameter(torch.randn(args.slots, args.dim)) if args.queries == "shared" else None  # N(0, I), DETR's
    return FlowDetector(memory, blocks, num_classes, args.dim, guard=not args.no_guard, queries=queries,
                        predict=args.predict, z0_std=args.z0_std)


# ---- Targets, coupling and the matching loss -----------------------------------------------------
def slot_targets(targets, slots, num_classes, device):
    """Per image the first `slots` objects, background (class C, zero box) elsewhere: classes [B, M], boxes
    [B, M, 4] and the number of images with more objects than slots."""
    classes = torch.full((len(targets), slots), num_classes, dtype=torch.long)
    boxes = torch.zeros(len(targets), slots, 4)
    overflow = 0
    for i, t in enumerate(targets):
        g = min(len(t["labels"]), slots)
        overflow += len(t["labels"]) > slots
        classes[i, :g], boxes[i, :g] = t["labels"][:g], t["boxes_norm"][:g]
    return classes.to(device), boxes.to(device), overflow


def object_slots(classes, num_classes):
    """Per image, the indices of the slots that hold an object (classes [B, M], num_classes = none)."""
    return [(c != num_classes).nonzero().squeeze(1) for c in classes]


def reorder_slots(assignments, classes, num_classes, *tensors):
    """Put object obj_idx[n] of image i (its n-th object slot, in annotation order) into slot
    slot_idx[n]; the background targets fill the other slots. assignments: per image (slot_idx,
    obj_idx) over its object slots. Returns classes [B, M] and every tensor [B, M, ...] permuted."""
    out = [classes.clone()] + [x.clone() for x in tensors]
    for i, ((slot_idx, obj_idx), objects) in enumerate(zip(assignments, object_slots(classes, num_classes))):
        objects = objects.cpu()
        if len(objects) == 0:
            continue
        order = torch.empty(classes.shape[1], dtype=torch.long)
        order[torch.as_tensor(slot_idx)] = objects[torch.as_tensor(obj_idx)]
        free = sorted(set(range(classes.shape[1])) - set(torch.as_tensor(slot_idx).tolist()))
        rest = sorted(set(range(classes.shape[1])) - set(objects.tolist()))
        order[torch.as_tensor(free, dtype=torch.long)] = torch.as_tensor(rest, dtype=torch.long)
        for x, src in zip(out, (classes, *tensors)):
            x[i] = src[i, order.to(src.device)]
    return out


def slot_matches(logits, pred_boxes, classes, boxes, num_classes):
    """Per image, (slot_idx, obj_idx): Hungarian matching (match_cost) of the predictions to the
    image's slot targets (classes [B, M] with num_classes = none, boxes [B, M, 4])."""
    held = object_slots(classes, num_classes)
    return hungarian(match_costs(logits, pred_boxes, [c[h] for c, h in zip(classes, held)],
                                 [b[h] for b, h in zip(boxes, held)]))


def match_cost(prob, boxes, gt_labels, gt_boxes):
    """DETR's matching cost [M, G]: -p[class] + 5 L1 - 2 GIoU. prob [M, C + 1], boxes [M, 4] cxcywh."""
    return (-prob[:, gt_labels] + 5 * torch.cdist(boxes, gt_boxes, p=1)
            - 2 * generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy")))


@torch.no_grad()
def match_costs(logits, boxes, gt_labels, gt_boxes):
    """match_cost of every image in one computation (DETR's trick: all predictions against all objects, each
    image keeps its block). logits [B, M, C + 1], boxes [B, M, 4]; per image gt [G_i], [G_i, 4] -> [M, G_i]."""
    sizes = [len(labels) for labels in gt_labels]
    batch, slots = logits.shape[:2]
    if sum(sizes) == 0:
        return [np.zeros((slots, 0), np.float32) for _ in sizes]
    cost = match_cost(logits.softmax(-1).flatten(0, 1), boxes.flatten(0, 1), torch.cat(gt_labels).to(logits.device),
                      torch.cat(gt_boxes).to(boxes.device))
    cost, ends = cost.view(batch, slots, -1).float().cpu().numpy(), np.cumsum(sizes)
    return [cost[i, :, end - size:end] for i, (size, end) in enumerate(zip(sizes, ends))]


def hungarian(costs):
    """Per cost matrix [M, G]: (rows, cols) of the minimum-cost assignment, as long tensors."""
    return [tuple(torch.as_tensor(a, dtype=torch.long) for a in linear_sum_assignment(c)) for c in costs]


def hungarian_match(logits, boxes, targets):
    """Per image: (pred_idx, gt_idx) minimising match_cost (DETR)."""
    return hungarian(match_costs(logits, boxes, [t["labels"] for t in targets], [t["boxes_norm"] for t in targets]))


def set_loss(logits, boxes, target_classes, target_boxes, num_classes, eos_coef=0.1, norms=None):
    """DETR's loss once every slot has its target [B, M] (num_classes = none) / [B, M, 4]: CE over all slots
    (no-object weighted 0.1), L1 x 5 and GIoU x 2 over the object slots divided, as DETR's SetCriterion, by the
    batch's ground-truth boxes, matched or not. norms: (num_boxes, CE weight) from `loss_normalisers`; None: the
    object slots, and the CE's own weighted mean."""
    num_boxes, ce_weight = norms or (None, None)
    weight = torch.ones(num_classes + 1, device=logits.device, dtype=logits.dtype)
    weight[num_classes] = eos_coef
    ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight) if ce_weight is None else \
        F.cross_entropy(logits.transpose(1, 2), target_classes, weight, reduction="sum") / ce_weight
    held = target_classes != num_classes
    src, tgt = boxes[held], target_boxes[held]
    if len(tgt) == 0:
        return ce + src.sum() * 0
    num_boxes = max(num_boxes if num_boxes is not None else len(tgt), 1)
    l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
    giou = (1 - torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"),
                                               box_convert(tgt, "cxcywh", "xyxy")))).sum() / num_boxes
    return ce + 5 * l1 + 2 * giou


def loss_normalisers(targets, slots, eos_coef=0.1):
    """(num_boxes, CE weight) of `set_loss`: the batch's ground-truth boxes and, under torchrun, the CE's weight
    sum (objects 1, no-object eos_coef), both averaged over processes, so N processes at batch b train as one at
    N b (DETR all-reduces num_boxes only). One all-reduce per step; one process: (count, None)."""
    count = sum(len(t["labels"]) for t in targets)
    if core.world_size() == 1:
        return count, None
    held = sum(min(len(t["labels"]), slots) for t in targets)
    total = core.all_sum([count, held + eos_coef * (len(targets) * slots - held)])
    return total[0] / core.world_size(), total[1] / core.world_size()


def detection_loss(logits, boxes, targets, num_classes, eos_coef=0.1, norms=None):
    """DETR set loss: Hungarian matching of the slots to every ground-truth object (with more objects
    than slots, the matching picks which M), then set_loss normalised by all boxes of the batch."""
    target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.long, device=logits.device)
    target_boxes = torch.zeros_like(boxes)
    for i, (rows, cols) in enumerate(hungarian_match(logits, boxes, targets)):
        target_classes[i, rows] = targets[i]["labels"].to(logits.device)[cols]
        target_boxes[i, rows] = targets[i]["boxes_norm"].to(boxes.device)[cols]
    return set_loss(logits, boxes, target_classes, target_boxes, num_classes, eos_coef,
                    norms or loss_normalisers(targets, logits.shape[1], eos_coef))


@torch.no_grad()
def euler_states(model, feats, z0, last):
    """--train-path euler: [z0, z_(1/T), ..., z_(last/T)], the states at which inference hands the latent to
    blocks 0..last (Euler steps with the current weights, no gradient, dropout off as at inference)."""
    training = model.heads.training
    model.heads.eval()  # dropout off, as at inference: the states are the ones inference visits
    _, path = core.integrate(lambda j, z, t: model.velocity(j, z, feats, t), z0, model.T, stop=last,
                             return_path=True)
    model.heads.train(training)
    return [z0] + path


def euler_path_loss(model, k, feats, z, z1, classes, boxes, match=False):
    """--train-path euler: block k trains at the state z = z_(k/T) inference gives it (euler_states; z carries
    no gradient), regressing the straight path from z to z1. match (--coupling match): first each object moves to
    the slot whose prediction Hungarian-matches it, z1, classes and boxes alike. Returns (mse, z1_hat = z +
    (1 - t) v, classes, boxes); mse ||z1_hat - z1||^2 for refine, ||v - u||^2 for velocity. z1_hat does not
    depend on W_class, W_box here, so under the guard they keep their random init (--no-guard: the mse moves them)."""
    t = k / model.T
    z1_hat = z + (1 - t) * model.velocity(k, z, feats, torch.full((len(z),), t, device=z.device))
    if match:
        with torch.no_grad():
            classes, z1, boxes = reorder_slots(slot_matches(*model.decode(z1_hat), classes, boxes, model.num_classes),
                                               classes, model.num_classes, z1, boxes)
    target = z1.detach() if model.guard else z1
    scale = 1.0 if model.predict != "velocity" else 1 / (1 - t)  # z1_hat - z1 = (1 - t)(v - u)
    return (core.at_least_fp32(z1_hat - target) * scale).pow(2).mean(), z1_hat, classes, boxes


def block_loss(model, k, feats, targets, slots, args, z0, u, path=None, norms=None):
    """Loss of flow block k: flow_weight x flow MSE + detection loss of the decoded z1_hat. slots: slot_targets'
    (classes, boxes). z0 [B, M, d]: the block's noise, u [B] its t on the straight-line path. path: on the Euler
    path the batch's euler_states (computed here when None)."""
    classes, boxes = slots
    euler = args.train_path == "euler"
    z1 = model.targets(classes, boxes)
    if euler:
        z = (path or euler_states(model, feats, z0, k))[k]
        mse, z1_hat, classes, boxes = euler_path_loss(model, k, feats, z, z1, classes, boxes, args.coupling == "match")
    else:  # the paper's: velocity, objects in annotation order (check_flags)
        mse, z1_hat = core.flow_matching_loss(model.head(k), feats[0], z1, z0, u, detach_target=model.guard)
    logits, pred_boxes = model.decode(z1_hat)
    overflow = any(len(t["labels"]) > args.slots for t in targets)
    # match: the slot targets are the Hungarian matching of z1_hat already; a batch with an image of more than M
    # objects (and the index coupling) takes the Hungarian loss over all objects
    if euler and args.coupling == "match" and not overflow:
        return args.flow_weight * mse + set_loss(logits, pred_boxes, classes, boxes, model.num_classes,
                                                 norms=norms or loss_normalisers(targets, args.slots))
    return args.flow_weight * mse + detection_loss(logits, pred_boxes, targets, model.num_classes, norms=norms)


# ---- Inference and evaluation --------------------------------------------------------------------
def postprocess(logits, boxes, sizes, score_thresh=0.05, nms_iou=0.5):
    """Drop no-object, keep (slot, class) pairs with score >= thresh, per-class NMS, scale cxcywh in
    [0, 1] to each image's original pixels (VOC's 1-based convention). Returns one dict per image."""
    prob = logits.softmax(-1)[..., :-1]  # [B, M, C]
    out = []
    for i in range(len(prob)):
        h, w = sizes[i].tolist()
        xyxy = box_convert(boxes[i], "cxcywh", "xyxy") * torch.tensor([w, h, w, h], device=boxes.device)
        slot, cls = (prob[i] >= score_thresh).nonzero(as_tuple=True)
        scores, b = prob[i][slot, cls], xyxy[slot]
        keep = batched_nms(b, scores, cls, nms_iou)
        out.append({"boxes": (b[keep] + torch.tensor([1.0, 1.0, 0.0, 0.0], device=b.device)).cpu(),
                    "scores": scores[keep].cpu(), "labels": cls[keep].cpu()})
    return out


@torch.no_grad()
def predict(model, x, index, args, return_path=False, mode="euler", feats=None, start=None):
    """fm: Euler over T steps (block k on step k), or mode='ensemble' the mean of the T single steps (eqs.
    27-28), from start 'noise' (z0 seeded per image) or 'mean' (z0 = 0); None: --z0-infer. bp: one forward.
    feats: x's memory if computed. Returns (logits, boxes), or with return_path those after every Euler step."""
    if args.method == "bp":
        return model(x)
    feats = model.backbone(x) if feats is None else feats
    z0 = (model.noise(core.noise_for(index, (args.slots, model.dim), args.seed, x.device))
          if (start or args.z0_infer) == "noise" else torch.zeros(len(x), args.slots, model.dim, device=x.device))
    velocity = lambda k, z, t: model.velocity(k, z, feats, t).float()  # noqa: E731
    if mode == "ensemble":
        return model.decode(core.ensemble(velocity, z0, model.T))
    z, path = core.integrate(velocity, z0, model.T, return_path=True)
    return [model.decode(p) for p in path] if return_path else model.decode(z)


def all_gather(items):
    """The concatenation over processes (in rank order) of each process's list of picklable items."""
    if core.world_size() == 1:
        return list(items)
    out = [None] * core.world_size()
    torch.distributed.all_gather_object(out, list(items))
    return [item for part in out for item in part]


def evaluate(model, loader, args, device, num_classes):
    """map50 / map50_area of Euler inference from --z0-infer's start; fm also map50_ensemble and Euler from the
    other start (map50_noise or map50_mean)."""
    model.eval()
    chosen, other = args.z0_infer, {"noise": "mean", "mean": "noise"}[args.z0_infer]
    modes = [("euler", chosen)] + ([("ensemble", chosen), ("euler", other)] if args.method == "fm" else [])
    dets, gts = {m: [] for m in modes}, []
    for x, targets, index in loader:
        sizes, x = [t["size"] for t in targets], x.to(device)
        with torch.no_grad(), core.autocast(device, args.amp):
            feats = model.backbone(x) if args.method == "fm" else None  # once for every inference mode
        for mode, start in modes:
            with core.autocast(device, args.amp):
                logits, boxes = predict(model, x, index, args, mode=mode, feats=feats, start=start)
            dets[mode, start] += postprocess(logits, boxes, sizes, args.score_thresh, args.nms)
        gts += [{k: t[k] for k in ("boxes", "labels", "difficult")} for t in targets]
    dets, gts = {m: all_gather(d) for m, d in dets.items()}, all_gather(gts)  # torchrun: every shard
    euler = dets["euler", chosen]
    out = {"map50": voc_eval(euler, gts, num_classes)["map"],
           "map50_area": voc_eval(euler, gts, num_classes, use_07_metric=False)["map"]}
    if args.method == "fm":
        out["map50_ensemble"] = voc_eval(dets["ensemble", chosen], gts, num_classes)["map"]
        out[f"map50_{other}"] = voc_eval(dets["euler", other], gts, num_classes)["map"]
    return out


# ---- Training ------------------------------------------------------------------------------------
def train_step(model, forward, batch, blocks, noise_key, args, device):
    """One batch (x, targets, index), no optimiser step; returns the losses. fm: the backbone once, then
    core.blockwise_backward over `blocks` (block_loss; on the Euler path one trajectory from block 0's noise
    serves every block), noise from core.train_noise keyed by (*noise_key, block). bp: the matching loss after
    every decoder layer (--no-aux-loss: the last only). forward: the DDP wrapper under torchrun, else None."""
    x, targets, index = batch
    x = x.to(device, non_blocking=True)
    norms = loss_normalisers(targets, args.slots)  # the set loss's normalisers, over all processes
    with core.autocast(device, args.amp):
        if args.method == "bp":
            outs = (forward or model)(x, every_layer=True) if args.aux_loss else [(forward or model)(x)]
            return core.joint_backward(sum(detection_loss(logits, boxes, targets, model.num_classes, norms=norms)
                                           for logits, boxes in outs))
        feats = (forward or model.backbone)(x)
        slots = slot_targets(targets, args.slots, model.num_classes, x.device)[:2]

        def noise(k):  # (z0 [B, M, d], u [B]) of block k
            key = None if noise_key is None else (*noise_key, k)
            draw, u = core.train_noise(index, key, (args.slots, model.dim), device, n=len(x))
            return model.noise(draw), u
        path = euler_states(model, feats, noise(0)[0], max(blocks)) if args.train_path == "euler" else None

        def loss(k, f):
            return block_loss(model, k, f, targets, slots, args, *((path[0], None) if path else noise(k)), path=path,
                              norms=norms)
        losses = core.blockwise_backward(feats, blocks, loss, all_features=forward is not None)
    return {"loss": sum(losses.values()) / len(losses), **{f"loss_b{k}": v for k, v in losses.items()}}


def summary(record):
    """The per-epoch line: validation map50 (and fm's other read-outs), test at the end."""
    names = ("map50", "map50_area", "map50_ensemble", "map50_noise", "map50_mean")
    parts = [f"{title} " + " ".join(f"{n} {record[prefix + n]:.4f}" for n in names if prefix + n in record)
             for title, prefix in (("val", "val_"), ("TEST", "")) if prefix + "map50" in record]
    return " | ".join([f"loss {record['loss']:.4f}"] + parts)


def check_flags(args):
    """One-line exit for values and combinations that cannot run, before anything is written."""
    for name in ("epochs", "bs", "T"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} must be at least 1, got {getattr(args, name)}")
    if args.method == "bp" and args.mode == "sequential":
        sys.exit("error: --mode sequential trains flow heads one at a time; it does not apply to --method bp")
    if args.method == "fm" and args.train_path == "line" and (args.coupling, args.predict) != ("index", "velocity"):
        sys.exit("error: --train-path line is the paper's path: it takes --coupling index and --predict velocity "
                 "(match and refine train on the Euler path, --train-path euler)")
    if args.method == "fm" and args.predict == "refine" and args.z0_std <= 0:
        sys.exit("error: --predict refine needs noise (--z0-std > 0): c_skip(0) is 0 / 0 without it")
    if not 0 <= args.crop <= 1:
        sys.exit(f"error: --crop is the smallest side kept, a fraction of the image in [0, 1]; got {args.crop}")


def main(args):
    device = core.init_distributed(args.device)
    core.seed_everything(args.seed)
    check_flags(args)
    try:
        train_set, val_set, test_set, classes = prepare_data(args)  # written / downloaded once
        model = build_model(args, len(classes)).to(device)
        overflow = sum(len(train_set.dataset.annotation(i)["labels"]) > args.slots for i in range(len(train_set)))
    except (core.DataError, core.WeightsError) as e:
        sys.exit(f"error: {e}")
    sets = {name: torch.utils.data.Subset(data, range(min(args.eval_limit, len(data)))) if args.eval_limit else data
            for name, data in (("val", val_set), ("test", test_set)) if data is not None}
    loaders = {name: torch.utils.data.DataLoader(core.shard(data), max(args.bs, 8), shuffle=False, collate_fn=collate,
                                                 num_workers=args.workers, pin_memory=device.type == "cuda")
               for name, data in sets.items()}
    backbone, ids = list(model.backbone.trunk.parameters()), {id(p) for p in model.backbone.trunk.parameters()}
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": args.lr},
                                   {"params": backbone, "lr": args.lr_backbone}], weight_decay=args.wd,
                                  fused=device.type == "cuda", foreach=device.type != "cuda")  # fewest kernels
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [args.lr_drop], 0.1)  # stepped per epoch
    if args.compile:
        core.compile_model(model)
    passes = core.head_schedule(args.T, args.method == "fm" and args.mode == "sequential")
    if core.is_main():  # once data and model are built, so a bad input stops with its error line alone
        print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
        weights = args.weights or ("none" if args.no_pretrained else "ImageNet")
        print(f"{args.method} on {args.dataset}: {args.backbone} (weights: {weights}) T={args.T} mode={args.mode} "
              f"{f'recipe={args.recipe} ' if args.method == 'fm' else ''}coupling={args.coupling} M={args.slots} "
              f"crop={args.crop} device={device}; {overflow} training images have more than {args.slots} objects "
              f"(the flow targets keep the first {args.slots}; the Hungarian loss matches among all)")
    evaluate_on = {name: functools.partial(evaluate, loader=loader, args=args, device=device, num_classes=len(classes))
                   for name, loader in loaders.items()}
    return run(args, model, optimizer, scheduler, None, train_set, passes,
               functools.partial(train_step, args=args, device=device), evaluate_on, {"num_classes": len(classes)},
               schedule_per_step=False, collate_fn=collate)


def prepare_data(args):
    """build_data, and the digits-pretrained tiny trunk where --backbone tiny needs it (into args.weights), holding
    --data's lock: what writes files under --data (minivoc, VOC's download, the trunk) does it once, and a run or
    torchrun rank started beside another on the same fresh --data waits for it, then reuses what it wrote."""
    with core.data_lock(args.data):
        data = build_data(args)
        if args.backbone == "tiny" and not (args.weights or args.no_pretrained):
            args.weights = tiny_weights(args)
    return data


# ---- The run: resume, epochs, evaluation, log, checkpoint (the same text in every script) --------
def run(args, model, optimizer, scheduler, ema, train_set, passes, step, evaluate, extra, collate_fn=None,
        **engine):
    """Train args.epochs epochs with core.train_one_epoch; per epoch evaluate["val"] (logged as val_*),
    after the last evaluate["test"] (every epoch with --test-every-epoch), one printed line, one JSON
    line in the log beside --out, then an atomic checkpoint. SIGTERM: save the position, exit 143."""
    script, say = os.path.basename(__file__), functools.partial(print, flush=True) if core.is_main() else (lambda text: None)
    try:
        start, position = core.start_or_resume(args.out, script, vars(args), RESUME_MATCH, args.resume, model,
                                               optimizer, scheduler, ema)
    except core.CheckpointError as e:
        sys.exit(f"error: {e}")
    forward, local = core.distribute(model, args.method)
    loader = core.train_loader(train_set, args.workers, collate_fn, next(model.parameters()).device)
    save = functools.partial(core.save_run, args.out, model, optimizer, scheduler, ema, script=script,
                             flags=vars(args), **extra)
    say(f"batch {args.bs} per process x {core.world_size()} process(es) = {args.bs * core.world_size()} global; "
        f"{core.steps_per_pass(train_set, args.bs, args.seed, args.max_steps) * len(passes)} steps per epoch")
    peak, record = None, None
    with core.Preemption() as preempt:
        for epoch in range(start, args.epochs):
            resume = position if position and position["epoch"] == epoch else None
            t0 = time.time() - (resume["elapsed"] if resume else 0.0)
            test = evaluate.get("test") if epoch + 1 == args.epochs or args.test_every_epoch else None
            try:
                losses, peak = core.train_one_epoch(
                    model, step, passes, optimizer, scheduler, loader, epoch, bs=args.bs, seed=args.seed,
                    clip=args.clip, max_steps=args.max_steps, forward=forward, local_params=local, ema=ema,
                    preempt=preempt, resume=resume, peak=peak, epochs=args.epochs, **engine)
                metrics = core.evaluate_run(model, ema, evaluate.get("val"), test)
            except core.Preempted as stop:  # the step is done: save the position inside the epoch, exit
                save(epoch - 1, stop.position)
                say(f"SIGTERM: saved epoch {epoch + 1} at step {stop.position['count']} to {args.out}; "
                    f"continue with --resume")
                sys.exit(core.Preemption.EXIT_CODE)
            except core.NonFiniteLoss as e:
                sys.exit(f"error: {e} at epoch {epoch + 1} step {e.step}; the last good checkpoint {args.out} "
                         f"is untouched")
            except core.DataError as e:
                sys.exit(f"error: {e}")
            record = {"epoch": epoch + 1, **losses, **metrics, "lr": scheduler.get_last_lr()[0],
                      "time": time.time() - t0, "peak_step_bytes": peak, "global_batch": args.bs * core.world_size()}
            if core.world_size() > 1:
                record["replica_max_diff"] = core.replica_difference(model)
            say(f"epoch {epoch + 1}/{args.epochs} {summary(record)} ({record['time']:.1f}s)")
            if core.is_main():  # log first: a kill before the save repeats the epoch
                with open(core.log_path(args.out), "a") as f:
                    f.write(json.dumps(record) + "\n")
            save(epoch, None)
            if preempt.requested():
                say(f"SIGTERM: saved epoch {epoch + 1} to {args.out}; continue with --resume")
                sys.exit(core.Preemption.EXIT_CODE)
    return record


if __name__ == "__main__":
    main(parse_args())
