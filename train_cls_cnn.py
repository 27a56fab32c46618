"""DFM image classification with a CNN trained from scratch (paper Appendix D.2, Table 5, Table 3).

Setup (paper defaults): three conv stages of 96 / 384 / 1536 channels, latent d = 512, T residual-MLP
flow heads (hidden 1024, LayerNorm, dropout) on the pooled features; AdamW lr 5e-4, wd 1e-4, 5-epoch
linear warmup then cosine, 200 epochs, batch 128, weight EMA 0.995, AutoAugment on CIFAR, gradient
clipping 1.0. Two head topologies: 'parallel' (all heads read the last stage, the paper's
"parallel consensus") and 'sequential' (head k reads stage k). Two schedules: --mode parallel (every
batch trains all heads) and --mode sequential (Algorithm 1: per epoch, per block k, a full pass).

T: the paper does not give T for the CNN. We use T = 3: the sequential topology attaches one head per
conv stage, and three stages give three heads, so both topologies run with the same number of heads
and the Table 3 comparison is like for like. With --T other than 3 in the sequential topology, heads
are spread evenly over the stages (head k reads stage floor(k * 3 / T)).

--method bp: the paper's baseline (D.2 "From-Scratch Baselines"): the same backbone, then T stacked
residual-MLP layers of the heads' size and a linear classifier, trained end to end; its own defaults
(60 epochs, batch 128, AdamW lr 1e-3, wd 0.01, cosine) apply unless the flags are given.

Quickstart (offline, real handwritten digits from scikit-learn; measured numbers in README.md):
    python train_cls_cnn.py --dataset digits --out runs/cnn_digits.pt
digits is not a paper setup: it runs a small CNN (channels 32/64/128, d = 64, hidden 256, 30 epochs,
EMA 0.98) so that the quickstart takes a couple of minutes on a laptop CPU.
"""
import argparse
import os
import sys

import torch
import torch.nn as nn
from torchvision.transforms import v2

import core

# --method bp overrides these defaults when the flag is not given (paper D.2)
BP_DEFAULTS = {"epochs": 60, "bs": 128, "lr": 1e-3, "wd": 0.01, "warmup": 0, "ema": 0.0}
# native input size per dataset
IMG_SIZE = {"digits": 8, "mnist": 28, "cifar10": 32, "cifar100": 32, "tinyimagenet": 64}
# flags left at None take the paper's D.2 CNN setup; digits (not in the paper) gets a small CPU config
PAPER = dict(channels="96,384,1536", dim=512, hidden=1024, epochs=200, warmup=5, ema=0.995)
SETUPS = {name: PAPER for name in IMG_SIZE}
SETUPS["digits"] = dict(channels="32,64,128", dim=64, hidden=256, epochs=30, warmup=1, ema=0.98)


def get_args_parser():
    p = argparse.ArgumentParser("DFM CNN classification from scratch", add_help=True)
    # data
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "mnist", "tinyimagenet", "digits"],
                   help="dataset; digits is scikit-learn's offline handwritten digits")
    p.add_argument("--data", default="data", help="dataset root folder (downloaded there when online)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: the dataset's native size)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (0 for digits)")
    # method
    p.add_argument("--method", default="fm", choices=["fm", "bp"], help="flow matching, or the backprop baseline")
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential"],
                   help="schedule: every batch trains all heads, or Algorithm 1 (a full pass per head)")
    p.add_argument("--topology", default="parallel", choices=["parallel", "sequential"],
                   help="heads on the last stage (parallel consensus), or head k on stage k")
    p.add_argument("--T", type=int, default=3, help="number of flow heads (bp: number of stacked layers)")
    p.add_argument("--time-split", action="store_true", help="head k trains on t in [k/T, (k+1)/T) only")
    p.add_argument("--sigma-min", type=float, default=0.0, help="Lipman OT path sigma_min (0 = paper)")
    p.add_argument("--t-dist", default="uniform", choices=["uniform", "early", "zero"],
                   help="t during training: U[0,1] (paper), u^2 (more weight near t=0), or 0 (core.sample_t)")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the anchor cross-entropy (paper: 1)")
    p.add_argument("--mse", default="mean", choices=["mean", "sum"],
                   help="flow MSE averaged over latent dims (A.1.1 'MSE') or summed (||.||^2 of Alg. 1)")
    p.add_argument("--no-guard", action="store_true", help="disable the class-embedding collapse guard")
    # model size
    p.add_argument("--channels", default=None, help="channels of the three conv stages (paper 96,384,1536)")
    p.add_argument("--dim", type=int, default=None, help="latent dimension d (paper 512)")
    p.add_argument("--hidden", type=int, default=None, help="hidden width of the residual-MLP heads (paper 1024)")
    p.add_argument("--head-blocks", type=int, default=2, help="residual blocks per head")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in the heads")
    # optimisation
    p.add_argument("--epochs", type=int, default=None, help="epochs (paper 200; bp 60)")
    p.add_argument("--bs", type=int, default=128, help="batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (bp default 1e-3)")
    p.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay (bp default 0.01)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup epochs before cosine (paper 5; bp 0)")
    p.add_argument("--ema", type=float, default=None, help="weight EMA decay, 0 to disable (paper 0.995; bp 0)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping max norm")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    # run
    p.add_argument("--seed", type=int, default=0, help="random seed (also seeds evaluation noise)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="run.pt", help="checkpoint path; the JSON-lines log goes beside it")
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke tests)")
    return p


def apply_method_defaults(args, argv):
    """Fill the dataset's setup, then bp's own D.2 defaults; a flag given on the command line wins."""
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
    for key, value in SETUPS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.method == "bp":
        for key, value in BP_DEFAULTS.items():
            if key not in given:
                setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def build_data(args):
    size = args.img_size or IMG_SIZE[args.dataset]
    if args.dataset == "digits":  # tensors [1, 8, 8]; a small random shift as augmentation
        train_tf = v2.Compose([v2.Resize(size, antialias=True), v2.RandomAffine(0, translate=(0.1, 0.1)),
                               v2.Normalize([0.5], [0.5])])
        test_tf = v2.Compose([v2.Resize(size, antialias=True), v2.Normalize([0.5], [0.5])])
    else:
        gray = args.dataset == "mnist"
        mean, std = ([0.5], [0.5]) if gray else ([0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261])
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        aug = [] if gray else [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip(),
                               v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)]
        train_tf = v2.Compose([v2.Resize(size, antialias=True)] + aug + to_tensor)
        test_tf = v2.Compose([v2.Resize(size, antialias=True)] + to_tensor)
    train, test, num_classes = core.classification_data(args.dataset, args.data, train_tf, test_tf)
    in_ch = 1 if args.dataset in ("digits", "mnist") else 3
    return core.Seeded(core.WithIndex(train), args.seed), core.WithIndex(test), num_classes, in_ch


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class ConvBackbone(nn.Module):
    """Three stages of conv3x3-BN-ReLU-maxpool2; returns the global-average-pooled output of every
    stage, [B, C_s] each (the sequential topology reads stage k, the parallel one the last)."""

    def __init__(self, in_ch, channels):
        super().__init__()
        self.stages = nn.ModuleList()
        for c in channels:
            self.stages.append(nn.Sequential(nn.Conv2d(in_ch, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                             nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)))
            in_ch = c
        self.channels = list(channels)

    def forward(self, x):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x.mean((2, 3)))
        return feats


class BPClassifier(nn.Module):
    """The bp baseline: backbone, T stacked residual-MLP layers of the heads' size, linear classifier."""

    def __init__(self, backbone, num_classes, dim, hidden, T, blocks, dropout):
        super().__init__()
        self.backbone = backbone
        widths = [backbone.channels[-1]] + [dim] * T
        self.layers = nn.ModuleList(core.ResidualMLP(widths[i], hidden, dim, blocks, dropout) for i in range(T))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x):
        h = self.backbone(x)[-1]
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def build_model(args, num_classes, in_ch):
    """The model of this script for `args` (analyze.py rebuilds checkpoints through this)."""
    channels = [int(c) for c in str(args.channels).split(",")]
    backbone = ConvBackbone(in_ch, channels)
    if args.method == "bp":
        return BPClassifier(backbone, num_classes, args.dim, args.hidden, args.T, args.head_blocks, args.dropout)
    if args.topology == "sequential":
        stages = [k * len(channels) // args.T for k in range(args.T)]
    else:
        stages = [len(channels) - 1] * args.T
    heads = [core.MLPFlowHead(channels[s], args.dim, args.hidden, args.head_blocks, args.dropout) for s in stages]
    return core.FlowClassifier(backbone, heads, num_classes, args.dim, stages, channels[-1], guard=not args.no_guard)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_step(model, x, y, heads, args, device, forward=None, index=None, noise_key=None):
    """Forward + block-wise (fm) or joint (bp) backward, no optimiser step (core.classifier_step)."""
    return core.classifier_step(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True), heads,
                                device, args, forward, index, noise_key)


def main(args):
    device = core.init_distributed(args.device)
    core.seed_everything(args.seed)
    core.check_flags(args)
    try:
        train_set, test_set, num_classes, in_ch = build_data(args)
    except core.DataError as e:
        sys.exit(f"error: {e}")
    if args.dataset == "digits":
        args.workers = 0  # in-memory tensors: worker processes only add start-up time
    test_loader = torch.utils.data.DataLoader(core.shard(test_set), 512, shuffle=False, num_workers=args.workers)

    model = build_model(args, num_classes, in_ch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
    steps = core.steps_per_epoch(train_set, args)
    scheduler = core.warmup_cosine(optimizer, args.warmup * steps, args.epochs * steps)
    ema = core.make_ema(model, args.ema) if args.ema > 0 else None
    if core.is_main():
        print(f"{args.method} on {args.dataset}: T={args.T} mode={args.mode} topology={args.topology} "
              f"params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M device={device}")
    arch = ("method", "topology", "T", "channels", "dim", "hidden", "head_blocks", "dataset", "img_size", "no_guard")
    return core.fit(args, os.path.basename(__file__), arch, model, optimizer, scheduler, train_set,
                    lambda m, fwd, b, heads, key: train_step(m, b[0], b[1], heads, args, device, fwd, b[2], key),
                    lambda m: core.evaluate_classifier(m, test_loader, device, args.seed, args.amp),
                    core.classification_summary, ema=ema, extra_state={"num_classes": num_classes, "in_ch": in_ch})


if __name__ == "__main__":
    argv = sys.argv[1:]
    main(apply_method_defaults(get_args_parser().parse_args(argv), argv))
