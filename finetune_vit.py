"""DFM fine-tuning of a pretrained ViT with flow heads (paper Section 5.3, Table 2, D.2 "Pre-trained
Fine-Tuning").

Result offline (issue 37; 2-core CPU, 360 test images, seeds 0-4, each tested once): a ViT-tiny (16 px,
4 px patches, 4 blocks) pretrained with bp on an MNIST-format source, fine-tuned on digits (~2-3 min a run):
T = 4 fm ensemble 0.992 (0.986-0.994), bp 0.989 (0.978-0.994), flow maps steps 1 / 8 0.986 / 0.976; T = 8 fm
0.996, bp 0.986; linear probe on the source 0.947. Step memory T = 4 / 8: fm 66.8 / 66.8, bp 103.3 / 154.4 MiB.
    python docs/make_digits_mnist.py --out data/src --transfer --n-train 16000
    python finetune_vit.py --dataset mnist --data data/src --model vit_tiny_patch16_224 --no-pretrained \
        --img-size 16 --patch 4 --depth 4 --method bp --out src.pt                      # pretrain (15 epochs)
    python finetune_vit.py --dataset digits --weights src.pt [--method bp | --objective flowmap]  # fine-tune

Setup (paper defaults): timm vit_base_patch16_224.augreg_in1k (ImageNet-1k only; the bare name resolves to
an ImageNet-21k checkpoint) without its classifier; its unpooled tokens (class token + patches, after the
final norm) feed T = 4 token flow heads (core.TokenFlowHead: one transformer block each, the capacity of
one of bp's encoder layers). AdamW, backbone lr 1e-6, heads 1e-4 (ImageNet-R 1e-3), clipping 1.0.
CIFAR-10 20 epochs, CIFAR-100 10 (batch 32), ImageNet-R 50 (batch 64; its class folders split 80/20 with
a fixed seed); images resized to 224. Where the paper is silent: weight decay 1e-4, cosine without warmup.
--method bp: the backbone, T encoder layers of its width, mean pool, linear; end to end, the same schedule.

Weights: --pretrained (default) timm's download; --weights FILE a .safetensors / .pth state dict or a
finetune_vit.py run, whose backbone is taken and whose --model, --img-size, --patch and --depth become the
defaults (another image grid: position embeddings resampled by timm; another architecture: one line);
--no-pretrained random init (backbone lr = the heads'). The checkpoint records the weights' source.
digits with pretrained weights (not a paper setup; chosen on validation): 20 epochs, 1 warm-up epoch; fm lr
1e-3 for heads and backbone (the paper's ratio 0.01 read 0.943 on validation, no split 0.970), bp 3e-3 and
3e-5 (the paper's ratio; ratios 0.01-1 within 0.004); flow maps --sg-features detach, --diag 0.5.
digits from random init (16 px, 4 px patches, 4 blocks, lr 1e-3 for all): fm t ~ u^2, lam 3, 90 epochs,
bp 30; flow maps --sg-features detach; fm 0.972, bp 0.987 (seeds 0-4; docs/research_notes.md).
mnist (torchvision's files): the transfer source, the random-init setup at 15 epochs, 10 deg rotation.
"""
import argparse
import functools
import hashlib
import json
import logging
import os
import sys
import time

import timm
import torch
import torch.nn as nn
import torchvision
from torch.utils.data import Subset
from torchvision.transforms import v2

import core

# per dataset (paper D.2): epochs, batch size, head lr; digits, mnist: offline CPU configs, not paper setups
PAPER = dict(t_dist="uniform", lam=1.0)
SCRATCH_CPU = dict(epochs=90, bs=64, lr=1e-3, warmup=2, t_dist="early", lam=3.0, diag=0.75, sg_features="detach")
SETUPS = {
    "cifar10": dict(epochs=20, bs=32, lr=1e-4, warmup=0, **PAPER),
    "cifar100": dict(epochs=10, bs=32, lr=1e-4, warmup=0, **PAPER),
    "imagenet-r": dict(epochs=50, bs=64, lr=1e-3, warmup=0, **PAPER),
    # from random init on CPU; t ~ u^2, lam 3, 90 epochs and (flow maps) the features' stop-gradient in SGFlow's
    # term chosen on validation (docs/research_notes.md); mnist: the pretraining source of the transfer protocol
    "digits": SCRATCH_CPU,
    "mnist": dict(SCRATCH_CPU, epochs=15, warmup=1),
}
BP_DIGITS = {"epochs": 30}  # digits, bp from random init (chosen on the validation split, as flowmap's diag 0.75)
SCRATCH = dict(img_size=16, patch=4, depth=4)  # digits or mnist from random init: a 4-block ViT, 16 px, 4 px patches
# digits from pretrained weights (e.g. --weights RUN.pt): the fine-tuning recipe per method, chosen on validation
# (docs/research_notes.md, issue 37); the backbone's lr is BACKBONE_RATIO x the heads' (the paper's: 0.01)
FROM_RUN = {"fm": dict(epochs=20, lr=1e-3, warmup=1, diag=0.5), "bp": dict(epochs=20, lr=3e-3, warmup=1)}
BACKBONE_RATIO = {"fm": 1.0, "bp": 0.01}
NUM_CLASSES_HINT = {"cifar10": 10, "cifar100": 100, "imagenet-r": 200, "digits": 10, "mnist": 10}


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("DFM fine-tuning of a pretrained ViT", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--dataset", default="cifar100", choices=list(SETUPS),
                   help="dataset (digits: offline; mnist: torchvision's MNIST files, e.g. a pretraining source)")
    p.add_argument("--data", default="data", help="dataset root (ImageNet-R: DIR/imagenet-r/<class>/*.jpg)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    # method
    p.add_argument("--method", default="fm", choices=["fm", "bp"], help="flow heads, or 4 encoder layers end to end")
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential"], help="block-wise schedule")
    p.add_argument("--sigma-min", type=float, default=0.0, help="Lipman OT path sigma_min (0 = paper)")
    p.add_argument("--t-dist", default="uniform", choices=["uniform", "early"],
                   help="t (flowmap: start t) in training: U[0,1] (paper) or u^2, more near 0 (core.time_law)")
    p.add_argument("--diag", type=float, default=0.25, help="flowmap: share of (t, u) draws with t = u (flow matching)")
    p.add_argument("--sg-features", default="train", choices=["train", "detach"],
                   help="flowmap: SGFlow's term trains the backbone too, or reads its features through a stop-gradient")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the CE on the t = 1 estimate (paper 1)")
    p.add_argument("--mse", default="mean", choices=["mean", "sum"], help="flow MSE reduction over latent dims")
    # model: a --resume must match these (and --dataset, --method, --final): RESUME_MATCH
    arch = p.add_argument_group("model")
    arch.add_argument("--objective", default="velocity", choices=["velocity", "flowmap"],
                      help="heads learn the velocity (the paper), or the flow map f(t, u, z) by SGFlow's loss")
    arch.add_argument("--span", default="global", choices=["global", "local"],
                      help="flowmap: every head maps all of [0, 1], or head k only its interval [k/T, (k+1)/T]")
    arch.add_argument("--T", type=int, default=4, help="flow heads (bp: encoder layers)")
    arch.add_argument("--no-guard", action="store_true", help="disable the class-embedding collapse guard")
    arch.add_argument("--model", default="vit_base_patch16_224.augreg_in1k",
                   help="any timm ViT, with its pretrained tag (default: ImageNet-1k only, as D.2; timm's bare "
                        "vit_base_patch16_224 resolves to ImageNet-21k pretraining, augreg2_in21k_ft_in1k)")
    p.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                   help="timm's pretrained weights for --model, downloaded when online")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random init")
    p.add_argument("--weights", default=None,
                   help="the backbone from a local .safetensors / .pth state dict, or from a finetune_vit.py run's "
                        "checkpoint (its --model, --img-size, --patch and --depth become the defaults)")
    arch.add_argument("--img-size", type=int, default=None, help="input size (random init or --weights; else the model's)")
    arch.add_argument("--patch", type=int, default=None, help="patch size (random init or --weights)")
    arch.add_argument("--depth", type=int, default=None,
                   help="transformer blocks (random init or --weights; else the model's; digits from scratch 4)")
    arch.add_argument("--feat-norm", default="none", choices=["none", "batch"],
                   help="batch: standardise the token features per channel (BatchNorm, no affine) before the heads")
    # optimisation
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the heads")
    p.add_argument("--epochs", type=int, default=10, help="epochs (paper: CIFAR-10 20, CIFAR-100 10, ImageNet-R 50)")
    p.add_argument("--bs", type=int, default=32, help="batch size (paper: CIFAR 32, ImageNet-R 64)")
    p.add_argument("--lr", type=float, default=1e-4, help="lr of heads / bp layers (paper 1e-4; ImageNet-R 1e-3)")
    p.add_argument("--lr-backbone", type=float, default=1e-6,
                   help="backbone lr (paper 1e-6; random init: --lr; digits with weights: BACKBONE_RATIO x --lr)")
    p.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup epochs before cosine (paper: none)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping max norm")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone and heads (bp: the model)")
    # run
    p.add_argument("--seed", type=int, default=0, help="random seed (also seeds evaluation noise)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--out", default="run.pt", help="checkpoint path; the JSON-lines log goes beside it")
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument("--init", default=None, metavar="RUN", help="start from the weights of a run of this model")
    p.add_argument("--final", action="store_true", help="train on train + validation; no val_ metrics")
    p.add_argument("--test-every-epoch", action="store_true", help="test every epoch (curves), not after the last only")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke tests)")
    return p


def parse_args(argv=None):
    """Flags with the --dataset setup (and a --weights run's architecture) as real argparse defaults: a first
    pass reads --dataset and the weights flags, a second --lr, the backbone's default (1e-6 with pretrained
    weights, BACKBONE_RATIO[method] x --lr on digits, else --lr). A flag the user typed always wins."""
    first, _ = get_args_parser(add_help=False).parse_known_args(argv)
    defaults = dict(SETUPS[first.dataset])
    scratch = not (first.pretrained or first.weights)
    try:
        source = source_run(first.weights) if first.weights else None
    except core.WeightsError as e:
        sys.exit(f"error: {e}")
    defaults.update({k: source["args"][k] for k in ("model", "img_size", "patch", "depth")} if source else {})
    if first.dataset in ("digits", "mnist") and scratch:
        defaults.update(SCRATCH)
    if first.dataset == "digits":
        defaults.update(FROM_RUN[first.method] if not scratch else BP_DIGITS if first.method == "bp" else {})
    second = get_args_parser(add_help=False)
    second.set_defaults(**defaults)
    lr = second.parse_known_args(argv)[0].lr
    parser = get_args_parser()
    parser.set_defaults(**defaults, lr_backbone=lr if scratch else BACKBONE_RATIO[first.method] * lr if
                        first.dataset == "digits" else 1e-6)
    return parser.parse_args(argv)


# the flags a --resume must match: the parser's model group, and what the data and the method are
RESUME_MATCH = ("dataset", "method", "final") + tuple(
    a.dest for g in get_args_parser()._action_groups if g.title == "model" for a in g._group_actions)


# ---- Model ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)  # parse_args and the backbone both ask: read the file once
def source_run(path):
    """The (read-only) checkpoint if a finetune_vit.py run wrote `path`, None for a state dict; WeightsError."""
    try:
        state = core.load_checkpoint(path)
    except core.CheckpointError:
        return None
    if "script" not in state or "args" not in state:  # a {'model': state dict} wrapper
        return None
    if state["script"] != os.path.basename(__file__):
        raise core.WeightsError(f"{path} is a {state['script']} run, another architecture: --weights takes a "
                                f"{os.path.basename(__file__)} run or a ViT state dict (.safetensors / .pth)")
    return state


class ViTBackbone(nn.Module):
    """timm ViT without its classifier; returns [unpooled output tokens [B, N, D]]."""

    def __init__(self, name, pretrained, weights=None, img_size=None, patch=None, depth=None, feat_norm="none"):
        super().__init__()
        download = pretrained and not weights
        kw = {} if download else {k: v for k, v in (("img_size", img_size), ("patch_size", patch), ("depth", depth)) if v}
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no retry chatter when offline
        try:
            self.vit = timm.create_model(name, pretrained=download, num_classes=0, global_pool="", **kw)
        except Exception as e:  # timm's RuntimeError, or a network error from the hub
            if isinstance(e, RuntimeError) and "Unknown model" in str(e):
                raise core.WeightsError(f"timm has no model {name!r}") from None
            raise core.WeightsError(f"cannot get pretrained weights for {name} ({type(e).__name__}: offline?); pass "
                                    f"--weights FILE (.safetensors or .pth) or --no-pretrained") from None
        cfg = self.vit.pretrained_cfg or {}
        # what the weights are, for the log and the checkpoint: timm's architecture.tag, the file or run, random init
        self.source = (f"timm {cfg.get('architecture', name)}.{cfg.get('tag')}" if download else
                       f"file {weights}" if weights else "random init")
        run = source_run(weights) if weights else None
        if run:
            self.source = self.load_run(run, weights, name)
        elif weights:  # the file's classifier (head.*) is not part of the backbone
            core.load_weights(self.vit, weights, name, skip=("head.", "fc_norm.head"))
        self.dim = self.vit.embed_dim
        self.heads_hint = self.vit.blocks[0].attn.num_heads
        self.mean, self.std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
        self.img_size = self.vit.patch_embed.img_size[0]
        self.feat_norm = nn.BatchNorm1d(self.dim, affine=False) if feat_norm == "batch" else None

    def load_run(self, run, path, name):
        """The backbone of a finetune_vit.py run (its reported weights: the EMA's if it kept one), position
        embeddings resampled by timm when this model's patch grid differs; returns the source line."""
        flags, model = run["args"], run["ema"] or run["model"]
        ours = (name.split(".")[0], self.vit.patch_embed.patch_size[0], len(self.vit.blocks))
        theirs = (flags["model"].split(".")[0], flags["patch"], flags["depth"])
        if ours != theirs:
            raise core.WeightsError(f"{path} is a run of another architecture ({theirs[0]}, patch {theirs[1]}, "
                                    f"depth {theirs[2]}); this model is {ours[0]}, patch {ours[1]}, depth {ours[2]}")
        prefix = next(p for p in ("module.backbone.vit.", "backbone.vit.") if any(k.startswith(p) for k in model))
        state = {k[len(prefix):]: v for k, v in model.items() if k.startswith(prefix)}
        grid, old_grid = list(self.vit.patch_embed.grid_size), [flags["img_size"] // flags["patch"]] * 2
        resampled = grid != old_grid
        if resampled:  # timm's own resample (bicubic over the patch grid, prefix tokens kept)
            state["pos_embed"] = timm.layers.resample_abs_pos_embed(
                state["pos_embed"], new_size=grid, old_size=old_grid, num_prefix_tokens=self.vit.num_prefix_tokens)
        core.load_weights(self.vit, path, name, state=state)
        epoch = run["epoch"] + 1
        return (f"run {path}: {flags['method']} on {flags['dataset']}, {epoch} epoch{'s' * (epoch != 1)}" +
                (f"; position embeddings resampled {old_grid[0]}x{old_grid[1]} -> {grid[0]}x{grid[1]} by timm"
                 if resampled else ""))

    def forward(self, x):
        tokens = self.vit.forward_features(x)
        if self.feat_norm is not None:
            tokens = self.feat_norm(tokens.transpose(1, 2)).transpose(1, 2)
        return [tokens]


class BPClassifier(nn.Module):
    """bp: backbone, T standard encoder layers (timm Blocks of the same width), mean pool, linear."""

    def __init__(self, backbone, num_classes, T):
        super().__init__()
        self.backbone = backbone
        self.layers = nn.Sequential(*[timm.models.vision_transformer.Block(backbone.dim, backbone.heads_hint, qkv_bias=True)
                                      for _ in range(T)])
        self.head = nn.Sequential(nn.LayerNorm(backbone.dim), nn.Linear(backbone.dim, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.backbone(x)[-1]).mean(1))


def build_model(args, num_classes):
    """The model of this script for `args` (analyze.py rebuilds checkpoints through this)."""
    backbone = ViTBackbone(args.model, args.pretrained, args.weights, args.img_size, args.patch, args.depth,
                           args.feat_norm)
    if args.method == "bp":
        return BPClassifier(backbone, num_classes, args.T)
    heads = [core.TokenFlowHead(backbone.dim, backbone.dim, backbone.heads_hint, dropout=args.dropout,
                                maps=args.objective == "flowmap") for _ in range(args.T)]
    return core.FlowClassifier(backbone, heads, num_classes, backbone.dim, None, backbone.dim, guard=not args.no_guard,
                               objective=args.objective, span=args.span)


# ---- Data ----------------------------------------------------------------------------------------
DATA_HINTS = {"cifar10": "put cifar-10-batches-py/ under --data", "cifar100": "put cifar-100-python/ under --data",
              "mnist": "put MNIST/raw/*-ubyte files under --data (offline: docs/make_digits_mnist.py writes them)",
              "imagenet-r": "download imagenet-r.tar (github.com/hendrycks/imagenet-r) and extract it under --data"}
VAL_FRACTION = {"digits": 0.2}  # of the training part (10% elsewhere, at most 5,000; digits: 10% would be 144)


def read_dataset(name, root, train_tf, test_tf, download=True):
    """(train, train read with test_tf, test, num_classes) of one dataset; core.DataError with one line
    when it is missing (torchvision downloads CIFAR when online). ImageNet-R ships without a split: its
    class folders are split 80/20 with a fixed seed, the usual protocol."""
    if name == "digits":
        (xtr, ytr), (xte, yte) = core.digits_split()
        train = core.TensorImages(xtr, ytr, train_tf)
        return train, core.with_transform(train, test_tf), core.TensorImages(xte, yte, test_tf), 10
    if name == "imagenet-r":
        train = core.image_folder(os.path.join(root, "imagenet-r"), train_tf, name, DATA_HINTS[name])
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        cut, test = int(len(order) * 0.8), core.with_transform(train, test_tf)
        return Subset(train, order[:cut]), Subset(test, order[:cut]), Subset(test, order[cut:]), len(train.classes)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "mnist": torchvision.datasets.MNIST}[name]
    train, test = core.torchvision_sets(cls, name, root, train_tf, test_tf, DATA_HINTS[name], download)
    return train, core.with_transform(train, test_tf), test, len(train.classes)


def build_data(args, backbone):
    """(train, val, test, num_classes) at the backbone's input size and normalisation: validation carved from
    train (core.validation_indices) and read with the test transform; --final trains on both."""
    size = backbone.img_size
    if args.dataset in ("digits", "mnist"):  # [1, 8, 8] tensors or 28 px grey images -> 3 channels at the model's size
        to = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Resize(size, antialias=True),
              v2.Lambda(lambda x: x.expand(3, -1, -1)), v2.Normalize(backbone.mean, backbone.std)]
        # digit-safe augmentation at the native size: a small shift (on MNIST also a small rotation), never a flip
        train_tf = v2.Compose(to[:2] + [v2.RandomAffine(10 if args.dataset == "mnist" else 0, translate=(0.1, 0.1))]
                              + to[2:])
        test_tf = v2.Compose(to)
    else:
        to = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(backbone.mean, backbone.std)]
        train_tf = v2.Compose([v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()] + to)
        test_tf = v2.Compose([v2.Resize((size, size), antialias=True)] + to)
    train, train_plain, test, num_classes = read_dataset(args.dataset, args.data, train_tf, test_tf)
    val = None
    if not args.final:
        keep, held = core.validation_indices(len(train), VAL_FRACTION.get(args.dataset, 0.1))
        train, val = Subset(train, keep), core.WithIndex(Subset(train_plain, held))
    return core.Seeded(core.WithIndex(train), args.seed), val, core.WithIndex(test), num_classes


# ---- Training and evaluation ---------------------------------------------------------------------
def train_step(model, forward, batch, heads, noise_key, args, device):
    """One batch (x, y, index), no optimiser step: core.classifier_step with this run's recipe flags.
    forward: the DDP wrapper under torchrun, else None."""
    x, y, index = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return core.classifier_step(model, forward, x, y, index, heads, noise_key, amp=args.amp, lam=args.lam,
                                diag=args.diag, t_dist=args.t_dist, sigma_min=args.sigma_min, mse=args.mse,
                                sg_features=args.sg_features == "train")


def summary(record):
    """The per-epoch line (core.classification_summary) and the step memory, Table 2's memory column."""
    return core.classification_summary(record) + f" peak step memory {record['peak_step_bytes'] / 2**20:.1f} MiB"


def check_flags(args):
    """One-line exit for values and combinations that cannot run, before anything is written."""
    for name, least in (("epochs", 1), ("bs", 1), ("T", 1), ("ff_copies", 1), ("bn_batches", 0)):
        if getattr(args, name, least) < least:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    for used, flag in ((args.mode == "sequential", "--mode sequential trains flow heads one at a time"),
                       (args.objective == "flowmap", "--objective flowmap trains flow heads as flow maps"),
                       (getattr(args, "topology", "") == "sequential", "--topology sequential places flow heads")):
        if used and args.method != "fm":
            sys.exit(f"error: {flag}; it does not apply to --method {args.method}")
    if args.objective == "velocity" and args.span == "local":
        sys.exit("error: --span sets the times a flow-map head covers; it needs --objective flowmap")
    if not 0 <= args.diag <= 1:
        sys.exit(f"error: --diag is a share of the (t, u) draws, in [0, 1]; got {args.diag}")


def main(args):
    device = core.init_distributed(args.device)
    core.seed_everything(args.seed)
    check_flags(args)
    try:
        model = build_model(args, NUM_CLASSES_HINT[args.dataset])
        train_set, val_set, test_set, num_classes = build_data(args, model.backbone)
        if num_classes != NUM_CLASSES_HINT[args.dataset]:  # e.g. an ImageNet-R subset with fewer classes
            core.seed_everything(args.seed)
            model = build_model(args, num_classes)
        if args.init:  # e.g. flow maps from a velocity run's heads
            core.start_from_run(model, args.init)
    except (core.WeightsError, core.DataError) as e:
        sys.exit(f"error: {e}")
    model = model.to(device)
    if args.dataset == "digits":
        args.workers = 0  # in-memory tensors: worker processes only add start-up time
    loaders = {name: torch.utils.data.DataLoader(core.shard(data), 2 * args.bs, shuffle=False, num_workers=args.workers,
                                                 pin_memory=device.type == "cuda")
               for name, data in (("val", val_set), ("test", test_set)) if data is not None}
    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": args.lr},
                                   {"params": backbone, "lr": args.lr_backbone}], weight_decay=args.wd,
                                  fused=device.type == "cuda")  # one kernel for the whole update on a GPU
    passes = core.head_schedule(args.T, args.method == "fm" and args.mode == "sequential")
    steps = core.steps_per_pass(train_set, args.bs, args.seed, args.max_steps) * len(passes)
    scheduler = core.warmup_cosine(optimizer, args.warmup * steps, args.epochs * steps)
    if args.compile:
        core.compile_model(model)
    if core.is_main():  # once data and model are built, so a bad input stops with its error line alone
        print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
        print(f"{args.method} fine-tuning {args.model} ({model.backbone.source}) on {args.dataset}: T={args.T} "
              f"mode={args.mode} params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M device={device}")
    ks = core.topk_for(num_classes)
    evaluate = {name: functools.partial(core.evaluate_classifier, loader=loader, device=device, seed=args.seed,
                                        amp=args.amp, ks=ks) for name, loader in loaders.items()}
    extra = {"num_classes": num_classes, "weights": model.backbone.source}  # where the backbone's weights came from
    if args.weights:
        with open(args.weights, "rb") as f:
            extra["weights_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return run(args, model, optimizer, scheduler, None, train_set, passes,
               functools.partial(train_step, args=args, device=device), evaluate, extra)


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
