"""DFM image classification with a CNN trained from scratch (paper Appendix D.2, Table 5, Table 3).

Results (2-core CPU, seeds 0-2, test once per run): README, "Results" and "Comparison methods".
    python train_cls_cnn.py --dataset digits [--method bp|ff|noprop] --out runs/cnn_digits.pt
digits (scikit-learn's real handwritten digits, offline) is not a paper setup: a small CNN (channels
32/64/128, d = 64, hidden 256, 30 epochs, EMA 0.98), a couple of minutes on a laptop CPU.

Setup (paper defaults): three conv stages of 96 / 384 / 1536 channels, latent d = 512, T residual-MLP flow heads
(hidden 1024, LayerNorm, dropout) on the pooled features; AdamW lr 5e-4, wd 1e-4, 5-epoch linear warmup then cosine,
200 epochs, batch 128, weight EMA 0.995, AutoAugment on CIFAR, gradient clipping 1.0. Head topologies: 'parallel'
(all heads read the last stage, the paper's "parallel consensus") and 'sequential' (head k reads stage k).
Schedules: --mode parallel (every batch trains all heads), --mode sequential (Algorithm 1: a full pass per head).
T: the paper does not give T for the CNN; T = 3 puts one head per conv stage in the sequential topology (Table 3
like for like); other T spread the heads evenly over the stages (head k reads stage floor(k * 3 / T)).

--method bp (D.2 "From-Scratch Baselines"): the same backbone, T stacked residual-MLP layers of the
heads' size and a linear classifier, end to end; 60 epochs, batch 128, AdamW lr 1e-3, wd 0.01, cosine.

Departures from D.2, each with the flag that gives the paper's reading:
- Pooled features are standardised over the batch (--feat-norm batch; paper: unspecified, `none`): else bp's MLP
  layers learn the per-channel offset first and sat at chance for 3 epochs on 28x28 digits (research notes).
- The weight EMA (0.995) warms its decay up, min(0.995, (1 + n) / (10 + n)) at update n (at 200 epochs this
  changes nothing), its BatchNorm statistics averaged with the weights (--ema-bn raw: the trained model's).
- Before each evaluation the BatchNorm statistics are re-estimated on 10 training batches (precise BN; --bn-batches
  0: the running averages, which lag the weights: validation accuracy fell by up to 0.08 at the lr peak).
- CIFAR: RandomCrop (padding 4) + horizontal flip before AutoAugment (--no-crop-flip: AutoAugment
  alone, as D.2 states it); CIFAR-100 adds RandomErasing 0.25 (D.2), and with --topology sequential
  its fm heads are single-hidden-layer MLPs with dropout (--head-blocks 0, D.2).
- TinyImageNet (no CNN setup of the paper): ImageNet's normalisation and AutoAugment policy; top-5, top-10.
- MNIST, chosen on validation at the 8-epoch command (docs/research_notes.md, "Issue 28"): fm t ~ u^2 (--t-dist
  early; paper: uniform), d 128 (512), lr 2e-3 (5e-4), 1 warm-up epoch (5); bp 1 warm-up epoch (D.2: 0), lr 1e-3 (D.2's).

--method ff (SFF, core.ForwardForward) and noprop (NoProp-DT, core.NoPropDT: T blocks, a CNN each): the paper's
comparison methods; setups chosen on validation (METHOD_SETUPS); their departures from their papers: README.
"""
import argparse
import functools
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torchvision
from torch.utils.data import Subset
from torchvision.transforms import v2

import core

BP_DEFAULTS = {"epochs": 60, "bs": 128, "lr": 1e-3, "wd": 0.01, "warmup": 0, "ema": 0.0}  # --method bp: D.2's
# native input size per dataset
IMG_SIZE = {"digits": 8, "mnist": 28, "cifar10": 32, "cifar100": 32, "tinyimagenet": 64}
PAPER = dict(channels="96,384,1536", dim=512, hidden=1024, epochs=200, warmup=5, ema=0.995)  # D.2's CNN setup
SETUPS = {name: dict(PAPER, img_size=size) for name, size in IMG_SIZE.items()}
SETUPS["digits"].update(channels="32,64,128", dim=64, hidden=256, epochs=30, warmup=1, ema=0.98)
METHOD_SETUPS = {"fm": {"mnist": dict(t_dist="early", lr=2e-3, warmup=1, dim=128)},  # on validation (issue 28)
                 "bp": {"mnist": dict(lr=1e-3, warmup=1)},  # bp's, on the same validation, no fall in 6 seeds (issue 28)
                 "ff": {"digits": dict(lr=1.5e-3), "mnist": dict(ff_copies=8)},  # on validation (issue 30)
                 "noprop": {"digits": dict(lr=4e-3)}}
SETUPS["cifar100"].update(erasing=0.25)
SETUPS["tinyimagenet"].update(erasing=0.25)
# normalisation statistics; TinyImageNet is an ImageNet subset and uses ImageNet's
STATS = {"digits": ([0.5], [0.5]), "mnist": ([0.5], [0.5]), "cifar10": ([0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]),
         "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
         "tinyimagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("DFM CNN classification from scratch", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "mnist", "tinyimagenet", "digits"],
                   help="dataset; digits is scikit-learn's offline handwritten digits")
    p.add_argument("--data", default="data", help="dataset root folder (downloaded there when online)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (0 for digits)")
    # method
    p.add_argument("--method", default="fm", choices=["fm", "bp", "ff", "noprop"], help="DFM, backprop, SFF or NoProp-DT")
    p.add_argument("--ff-copies", type=int, default=4, help="ff: noisy copies of each image (SFF: 20)")
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential"], help="all heads per batch, or Alg. 1")
    p.add_argument("--sigma-min", type=float, default=0.0, help="Lipman OT path sigma_min (0 = paper)")
    p.add_argument("--t-dist", default="uniform", choices=["uniform", "early"],
                   help="t (flowmap: start t) in training: U[0,1] (paper) or u^2, more near 0 (core.time_law)")
    p.add_argument("--diag", type=float, default=0.25, help="flowmap: share of (t, u) draws with t = u (flow matching)")
    p.add_argument("--sg-features", default="train", choices=["train", "detach"],
                   help="flowmap: SGFlow's term trains the backbone too, or reads its features through a stop-gradient")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the anchor cross-entropy (paper: 1)")
    p.add_argument("--mse", default="mean", choices=["mean", "sum"], help="flow MSE: mean (A.1.1) or sum over d (Alg. 1)")
    # model: a --resume must match these (and --dataset, --method, --final): RESUME_MATCH
    arch = p.add_argument_group("model")
    arch.add_argument("--objective", default="velocity", choices=["velocity", "flowmap"],
                      help="heads learn the velocity (the paper), or the flow map f(t, u, z) by SGFlow's loss")
    arch.add_argument("--span", default="global", choices=["global", "local"],
                      help="flowmap: every head maps all of [0, 1], or head k only its interval [k/T, (k+1)/T]")
    arch.add_argument("--topology", default="parallel", choices=["parallel", "sequential"],
                      help="heads on the last stage (parallel consensus), or head k on stage k")
    arch.add_argument("--T", type=int, default=3, help="number of flow heads (bp: number of stacked layers)")
    arch.add_argument("--no-guard", action="store_true", help="disable the class-embedding collapse guard")
    arch.add_argument("--img-size", type=int, default=32, help="input size (the dataset's native size)")
    arch.add_argument("--channels", default=PAPER["channels"], help="channels of the three conv stages")
    arch.add_argument("--dim", type=int, default=PAPER["dim"], help="latent dimension d (paper 512)")
    arch.add_argument("--hidden", type=int, default=PAPER["hidden"], help="hidden width of the MLP heads (paper 1024)")
    arch.add_argument("--head-blocks", type=int, default=2,
                      help="residual blocks per head; 0: one hidden layer with dropout (paper: CIFAR-100 sequential)")
    arch.add_argument("--feat-norm", default="batch", choices=["batch", "none"],
                      help="standardise the pooled features over the batch (BatchNorm1d, no affine) or not")
    # optimisation
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in the heads")
    p.add_argument("--epochs", type=int, default=PAPER["epochs"], help="epochs (paper 200; bp 60)")
    p.add_argument("--bs", type=int, default=128, help="batch size")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (bp default 1e-3)")
    p.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay (bp default 0.01)")
    p.add_argument("--warmup", type=int, default=PAPER["warmup"], help="linear warmup epochs before cosine (paper 5; bp 0)")
    p.add_argument("--ema", type=float, default=PAPER["ema"],
                   help="weight EMA decay with warm-up min(decay, (1+n)/(10+n)), 0 to disable (paper 0.995; bp 0)")
    p.add_argument("--ema-bn", default="avg", choices=["avg", "raw"], help="EMA's BN statistics between evals: avg or raw")
    p.add_argument("--bn-batches", type=int, default=10, help="precise BN before each evaluation: BatchNorm statistics "
                   "re-estimated on this many training batches (core.precise_bn); 0: the running averages (paper)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping max norm")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone and heads (bp: the model)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for the convolutions")
    # augmentation (CIFAR, TinyImageNet)
    p.add_argument("--crop-flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random crop (padding 1/8) + horizontal flip before AutoAugment; D.2 states AutoAugment alone")
    p.add_argument("--erasing", type=float, default=0.0, help="RandomErasing probability (paper: CIFAR-100 0.25)")
    # run
    p.add_argument("--seed", type=int, default=0, help="random seed (also seeds evaluation noise)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="run.pt", help="checkpoint path; the JSON-lines log goes beside it")
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument("--init", default=None, metavar="RUN", help="start from the weights of a run of this model")
    p.add_argument("--final", action="store_true", help="train on train + validation; no val_ metrics")
    p.add_argument("--test-every-epoch", action="store_true", help="test every epoch (curves), not after the last only")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke tests)")
    return p


def parse_args(argv=None):
    """Flags with the --dataset setup, then bp's, as real argparse defaults (set_defaults after a first pass
    reads --dataset, --method and --topology). A flag the user typed always wins; --help shows what the
    run uses (e.g. `--dataset cifar100 --method bp --help`)."""
    first, _ = get_args_parser(add_help=False).parse_known_args(argv)
    defaults = dict(SETUPS[first.dataset])
    if first.dataset == "cifar100" and first.topology == "sequential" and first.method == "fm":
        defaults["head_blocks"] = 0  # D.2: single-hidden-layer MLP heads with dropout against overfitting
    if first.method == "bp":
        defaults.update(BP_DEFAULTS)
    defaults.update(METHOD_SETUPS.get(first.method, {}).get(first.dataset, {}))
    parser = get_args_parser()
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


# the flags a --resume must match: the parser's model group, and what the data and the method are
RESUME_MATCH = ("dataset", "method", "final") + tuple(
    a.dest for g in get_args_parser()._action_groups if g.title == "model" for a in g._group_actions)


# ---- Data ----------------------------------------------------------------------------------------
DATA_HINTS = {"cifar10": "put cifar-10-batches-py/ under --data", "cifar100": "put cifar-100-python/ under --data",
              "mnist": "put MNIST/raw/*-ubyte files under --data",
              "tinyimagenet": "download tiny-imagenet-200.zip (cs231n.stanford.edu) and unzip it under --data"}
VAL_FRACTION = {"digits": 0.2}  # of the training part (10% elsewhere, at most 5,000; digits: 10% would be 144)


def read_dataset(name, root, train_tf, test_tf, download=True):
    """(train, train read with test_tf, test, num_classes) of one dataset; core.DataError with one line
    when it is missing (torchvision downloads CIFAR and MNIST when online)."""
    if name == "digits":
        (xtr, ytr), (xte, yte) = core.digits_split()
        train = core.TensorImages(xtr, ytr, train_tf)
        return train, core.with_transform(train, test_tf), core.TensorImages(xte, yte, test_tf), 10
    if name == "tinyimagenet":
        train, test = core.tiny_imagenet(root, train_tf, test_tf, DATA_HINTS[name])
        return train, core.with_transform(train, test_tf), test, len(train.classes)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "mnist": torchvision.datasets.MNIST}[name]
    train, test = core.torchvision_sets(cls, name, root, train_tf, test_tf, DATA_HINTS[name], download)
    return train, core.with_transform(train, test_tf), test, len(train.classes)


def build_data(args):
    """(train, val, test, num_classes, in_channels): validation carved from train (core.validation_indices)
    and read with the test transform; --final trains on both. Items are (image, label, index)."""
    size, (mean, std) = args.img_size, STATS[args.dataset]
    if args.dataset == "digits":  # tensors [1, 8, 8]; a small random shift as augmentation
        train_tf = v2.Compose([v2.Resize(size, antialias=True), v2.RandomAffine(0, translate=(0.1, 0.1)),
                               v2.Normalize(mean, std)])
        test_tf = v2.Compose([v2.Resize(size, antialias=True), v2.Normalize(mean, std)])
    else:
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        aug = []
        if args.dataset != "mnist":  # D.2: AutoAugment on every CNN setup (ImageNet policy for TinyImageNet)
            crop_flip = [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()] if args.crop_flip else []
            policy = v2.AutoAugmentPolicy.IMAGENET if args.dataset == "tinyimagenet" else v2.AutoAugmentPolicy.CIFAR10
            aug = crop_flip + [v2.AutoAugment(policy)]
        erase = [v2.RandomErasing(args.erasing)] if args.erasing > 0 else []
        train_tf = v2.Compose([v2.Resize(size, antialias=True)] + aug + to_tensor + erase)
        test_tf = v2.Compose([v2.Resize(size, antialias=True)] + to_tensor)
    train, train_plain, test, num_classes = read_dataset(args.dataset, args.data, train_tf, test_tf)
    in_ch = 1 if args.dataset in ("digits", "mnist") else 3
    val = None
    if not args.final:
        keep, held = core.validation_indices(len(train), VAL_FRACTION.get(args.dataset, 0.1))
        train, val = Subset(train, keep), core.WithIndex(Subset(train_plain, held))
    return core.Seeded(core.WithIndex(train), args.seed), val, core.WithIndex(test), num_classes, in_ch


# ---- Model ---------------------------------------------------------------------------------------
class ConvBackbone(nn.Module):
    """Three stages of conv3x3-BN-ReLU-maxpool2; returns the global-average-pooled output of every
    stage, [B, C_s] each (the sequential topology reads stage k, the parallel one the last).
    feat_norm 'batch' standardises each pooled channel over the batch (BatchNorm1d, no affine): see
    the docstring's departures (on 28x28 digits a pooled channel's across-image std is 0.15 of its mean)."""

    def __init__(self, in_ch, channels, feat_norm="batch"):
        super().__init__()
        self.stages = nn.ModuleList()
        for c in channels:
            self.stages.append(nn.Sequential(nn.Conv2d(in_ch, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                             nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)))
            in_ch = c
        self.norms = nn.ModuleList(nn.BatchNorm1d(c, affine=False) if feat_norm == "batch" else nn.Identity()
                                   for c in channels)
        self.channels, self.local = list(channels), False  # local: no gradient between stages (--method ff)

    def forward(self, x, maps=False):
        feats, outs = [], []
        for stage, norm in zip(self.stages, self.norms):
            x = stage(x.detach() if self.local else x)
            outs.append(x)
            feats.append(norm(x.mean((2, 3))))  # [B, C_s]
        return (feats, outs) if maps else feats


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
    backbone = ConvBackbone(in_ch, channels, args.feat_norm)
    if args.method == "bp":
        return BPClassifier(backbone, num_classes, args.dim, args.hidden, args.T, args.head_blocks, args.dropout)
    if args.method == "ff":  # SFF's energy read-out reads the flattened last maps: each stage halves the side, rounding up
        side = functools.reduce(lambda s, _: -(-s // 2), channels, args.img_size)
        return core.ForwardForward(backbone, num_classes, "sff", channels[-1] * side ** 2, channels[-1], args.ff_copies)
    if args.method == "noprop":  # T blocks, each with its own CNN
        paths = [backbone] + [ConvBackbone(in_ch, channels, args.feat_norm) for _ in range(args.T - 1)]
        return core.NoPropDT(paths, channels[-1], num_classes, args.dim, args.hidden, guard=not args.no_guard)
    if args.topology == "sequential":
        stages = [k * len(channels) // args.T for k in range(args.T)]
    else:
        stages = [len(channels) - 1] * args.T
    maps = args.objective == "flowmap"
    heads = [core.MLPFlowHead(channels[s], args.dim, args.hidden, args.head_blocks, args.dropout, maps) for s in stages]
    return core.FlowClassifier(backbone, heads, num_classes, args.dim, stages, channels[-1], guard=not args.no_guard,
                               objective=args.objective, span=args.span)


# ---- Training and evaluation ---------------------------------------------------------------------
def train_step(model, forward, batch, heads, noise_key, args, device):
    """One batch (x, y, index), no optimiser step: core.classifier_step with this run's recipe flags.
    forward: the DDP wrapper under torchrun, else None."""
    x, y, index = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return core.classifier_step(model, forward, x, y, index, heads, noise_key, amp=args.amp, lam=args.lam,
                                diag=args.diag, t_dist=args.t_dist, sigma_min=args.sigma_min, mse=args.mse,
                                sg_features=args.sg_features == "train")


summary = core.classification_summary  # the per-epoch line


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
        train_set, val_set, test_set, num_classes, in_ch = build_data(args)
        model = build_model(args, num_classes, in_ch).to(device)
        if args.init:  # e.g. flow maps from a velocity run's heads
            core.start_from_run(model, args.init)
    except (core.DataError, core.WeightsError) as e:
        sys.exit(f"error: {e}")
    if args.dataset == "digits":
        args.workers = 0  # in-memory tensors: worker processes only add start-up time
    loaders = {name: torch.utils.data.DataLoader(core.shard(data), 512, shuffle=False, num_workers=args.workers)
               for name, data in (("val", val_set), ("test", test_set)) if data is not None}
    if args.channels_last:  # NHWC convolutions; train_step converts each batch
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, fused=device.type == "cuda")
    passes = core.head_schedule(args.T, args.method == "fm" and args.mode == "sequential")
    steps = core.steps_per_pass(train_set, args.bs, args.seed, args.max_steps) * len(passes)
    scheduler = core.warmup_cosine(optimizer, args.warmup * steps, args.epochs * steps)
    ema = core.make_ema(model, args.ema, args.ema_bn) if args.ema > 0 else None
    if args.compile:
        core.compile_model(model)
    if core.is_main():  # once data and model are built, so a bad input stops with its error line alone
        print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
        print(f"{args.method} on {args.dataset}: T={args.T} mode={args.mode} topology={args.topology} "
              f"params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M device={device}")
    ks = core.topk_for(num_classes)
    evaluate = {name: functools.partial(core.evaluate_classifier, loader=loader, device=device, seed=args.seed,
                                        amp=args.amp, ks=ks) for name, loader in loaders.items()}
    extra = {"num_classes": num_classes, "in_ch": in_ch}
    return run(args, model, optimizer, scheduler, ema, train_set, passes, functools.partial(
        train_step, args=args, device=device), evaluate, extra, bn_batches=args.bn_batches, bn_input=lambda b: b[0])


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
