"""DFM image classification with a ViT trained from scratch (paper Appendix D.2, Table 4, Table 3).

Result (offline digits quickstart, 2-core CPU, seeds 0-2, 360 test images, lrs chosen on the validation
split): fm ensemble 0.975 (0.972-0.978), bp 0.990 (0.983-0.997), ff (CFF) 0.992 (0.992-0.992).
    python train_cls_vit.py --dataset digits [--method bp|ff] --out runs/vit_digits.pt

Setups (paper defaults, picked by --dataset; every number can be overridden by its flag):
  cifar10       ViT[dim 128, depth 5, heads 4], patch 4, T = 5, 50 epochs, batch 128, random crop + flip
  cifar100      ViT[192, 6, 6], patch 4, T = 6, 300 epochs, batch 512, AutoAugment + RandomErasing 0.25
  tinyimagenet  ViT[dim 240, depth 7, heads 6] (the paper's ViT[240 6 7], read as [d, heads, depth] like
                its "ViT[128 4 5]: d = 128, depth 5, 4 heads"), 64x64 input, 8x8 conv stem, T = 7 (T =
                depth, as elsewhere), 1500 epochs, batch 256, AutoAugment + RandomErasing 0.25 + rotation 20
  mnist         the cifar10 setup on 28x28 grey images (patch 4)
  digits        not a paper setup: ViT[64, 2, 4] with a conv stem (a linear patch projection learned far
                slower) on the offline digits at 16x16, patch 4, T = 3, lr 4e-3 (bp 1e-3; both chosen on
                the validation split), 2 warmup epochs
AdamW lr 5e-4, wd 1e-4, 5-epoch warmup then cosine, gradient clipping 1.0, no EMA. No class token
and no global pooling: the backbone's unpooled token sequence is the memory every flow head reads.
TinyImageNet and CIFAR-100 are normalised with their own statistics (TinyImageNet: ImageNet's), and
from 100 classes on the log has top-5 and top-10 (Table 4).

Departure from D.2, the flow heads: D.2 describes residual-MLP predictors (hidden 1024, LayerNorm,
dropout) on [z_t, t_emb, f(x)] with global pooling omitted. The default is a token head
(core.TokenFlowHead: z_t + e_t as a query token through one transformer block over [query; tokens]):
it reads the unpooled sequence by attention, and one head is one encoder layer, what bp stacks T
times (equal capacity). --head flat is D.2's literal reading (the residual MLP on the flattened
tokens), --head mlp on mean-pooled tokens; measured on digits in docs/research_notes.md ("ViT heads").

--method bp: the paper's baseline: the same ViT, then T stacked transformer blocks of the heads' size,
mean pooling and a linear classifier, trained end to end (60 epochs, batch 128, lr 5e-4, wd 0.01).
--method ff: CFF (core.ForwardForward 'cff'), each block trained by its own contrastive loss on two augmented
views (core.TwoViews), a linear read-out; the paper's Forward-Forward comparison for the ViT (departures: README).
"""
import argparse
import functools
import json
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

BP_DEFAULTS = {"epochs": 60, "bs": 128, "lr": 5e-4, "wd": 0.01, "warmup": 0}  # --method bp: D.2's
SETUPS = {  # the paper's setups (D.2) per dataset, argparse defaults through parse_args
    "cifar10": dict(dim=128, depth=5, heads=4, T=5, patch=4, img_size=32, epochs=50, bs=128, stem="patch"),
    "cifar100": dict(dim=192, depth=6, heads=6, T=6, patch=4, img_size=32, epochs=300, bs=512, stem="patch"),
    "tinyimagenet": dict(dim=240, depth=7, heads=6, T=7, patch=8, img_size=64, epochs=1500, bs=256, stem="conv"),
    "mnist": dict(dim=128, depth=5, heads=4, T=5, patch=4, img_size=28, epochs=50, bs=128, stem="patch"),
    "digits": dict(dim=64, depth=2, heads=4, T=3, patch=4, img_size=16, epochs=40, bs=64, stem="conv", lr=4e-3, warmup=2),
}
SETUPS = {name: {"lr": 5e-4, "warmup": 5, **setup} for name, setup in SETUPS.items()}  # D.2's optimiser defaults
BP_DIGITS = {"lr": 1e-3}  # digits' lrs, chosen on its validation split (docs/research_notes.md): fm 4e-3, bp 1e-3
# normalisation statistics; TinyImageNet is an ImageNet subset and uses ImageNet's
STATS = {"mnist": ([0.5], [0.5]), "cifar10": ([0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]),
         "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
         "tinyimagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])}


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("DFM ViT classification from scratch", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "mnist", "tinyimagenet", "digits"],
                   help="dataset; digits is scikit-learn's offline handwritten digits")
    p.add_argument("--data", default="data", help="dataset root folder (downloaded there when online)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (0 for digits)")
    # method
    p.add_argument("--method", default="fm", choices=["fm", "bp", "ff"],
                   help="flow matching, the backprop baseline, or Forward-Forward (CFF, core.ForwardForward)")
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential"],
                   help="schedule: every batch trains all heads, or Algorithm 1 (a full pass per head)")
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
    arch.add_argument("--T", type=int, default=5, help="number of flow heads (bp: stacked blocks)")
    arch.add_argument("--head", default="token", choices=["token", "mlp", "flat"],
                      help="token head (one transformer block, the latent as a query token) over the unpooled "
                           "sequence; residual MLP on mean-pooled tokens; or on the flattened tokens (D.2's wording)")
    arch.add_argument("--no-guard", action="store_true", help="disable the class-embedding collapse guard")
    arch.add_argument("--img-size", type=int, default=32, help="input size")
    arch.add_argument("--dim", type=int, default=128, help="ViT width = latent dimension d")
    arch.add_argument("--depth", type=int, default=5, help="ViT depth")
    arch.add_argument("--heads", type=int, default=4, help="attention heads")
    arch.add_argument("--patch", type=int, default=4, help="patch size")
    arch.add_argument("--stem", default="patch", choices=["patch", "conv"], help="linear patch projection or conv stem")
    arch.add_argument("--hidden", type=int, default=1024, help="hidden width of --head mlp / flat")
    arch.add_argument("--head-blocks", type=int, default=2, help="residual blocks of --head mlp / flat")
    # optimisation
    p.add_argument("--dropout", type=float, default=0.1, help="dropout in the heads")
    p.add_argument("--epochs", type=int, default=50, help="epochs (bp 60)")
    p.add_argument("--bs", type=int, default=128, help="batch size (bp 128)")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (paper 5e-4)")
    p.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay (bp default 0.01)")
    p.add_argument("--warmup", type=int, default=5, help="linear warmup epochs before cosine (paper 5; bp 0)")
    p.add_argument("--ema", type=float, default=0.0,
                   help="weight EMA decay with warm-up min(decay, (1+n)/(10+n)), 0 to disable (paper: none for ViT)")
    p.add_argument("--ema-bn", default="avg", choices=["avg", "raw"],
                   help="EMA model's BatchNorm statistics (conv stem): averaged like the weights, or the trained model's")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping max norm")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone and heads (bp: the model)")
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
    reads --dataset and --method). A flag the user typed always wins; --help shows what the run uses."""
    first, _ = get_args_parser(add_help=False).parse_known_args(argv)
    parser = get_args_parser()
    defaults = dict(SETUPS[first.dataset])
    if first.method == "bp":
        defaults.update(BP_DEFAULTS, **(BP_DIGITS if first.dataset == "digits" else {}))
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
    size = args.img_size
    if args.dataset == "digits":  # tensors [1, 8, 8]; a small random shift as augmentation
        train_tf = v2.Compose([v2.Resize(size, antialias=True), v2.RandomAffine(0, translate=(0.1, 0.1)),
                               v2.Normalize([0.5], [0.5])])
        test_tf = v2.Compose([v2.Resize(size, antialias=True), v2.Normalize([0.5], [0.5])])
    else:
        mean, std = STATS[args.dataset]
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        aug = {"mnist": [],
               "cifar10": [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip()],
               "cifar100": [v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(),
                            v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)],
               "tinyimagenet": [v2.RandomRotation(20), v2.RandomCrop(size, padding=8), v2.RandomHorizontalFlip(),
                                v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)]}[args.dataset]
        erase = [v2.RandomErasing(0.25)] if args.dataset in ("cifar100", "tinyimagenet") else []
        train_tf = v2.Compose([v2.Resize(size, antialias=True)] + aug + to_tensor + erase)
        test_tf = v2.Compose([v2.Resize(size, antialias=True)] + to_tensor)
    train, train_plain, test, num_classes = read_dataset(args.dataset, args.data, train_tf, test_tf)
    in_ch = 1 if args.dataset in ("digits", "mnist") else 3
    val = None
    if not args.final:
        keep, held = core.validation_indices(len(train), VAL_FRACTION.get(args.dataset, 0.1))
        train, val = Subset(train, keep), core.WithIndex(Subset(train_plain, held))
    train = core.TwoViews(train) if args.method == "ff" else train  # CFF: two augmented views of each image
    return core.Seeded(core.WithIndex(train), args.seed), val, core.WithIndex(test), num_classes, in_ch


# ---- Model ---------------------------------------------------------------------------------------
class ViTBackbone(nn.Module):
    """timm VisionTransformer without class token or pooling. Returns the token sequence after every
    block, [B, N, D] each (the last one layer-normed): heads read the last, analyses all of them."""

    def __init__(self, img_size, patch, in_ch, dim, depth, heads, stem="patch"):
        super().__init__()
        self.vit = timm.models.vision_transformer.VisionTransformer(
            img_size=img_size, patch_size=patch, in_chans=in_ch, num_classes=0, embed_dim=dim, depth=depth,
            num_heads=heads, class_token=False, global_pool="")
        if stem == "conv":  # TinyImageNet: stride-`patch` conv stem instead of one linear patch projection
            layers, c, stride = [], in_ch, 1
            while stride < patch:
                layers += [nn.Conv2d(c, dim // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(dim // 2), nn.ReLU(inplace=True)]
                c, stride = dim // 2, stride * 2
            self.vit.patch_embed.proj = nn.Sequential(*layers, nn.Conv2d(c, dim, 1))
        self.channels, self.local = [dim] * depth, False  # local: no gradient between blocks (--method ff)

    def forward(self, x):
        vit = self.vit
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        feats = []
        for i, block in enumerate(vit.blocks):  # local: the embedding learns with block 0
            h = block(h.detach() if self.local and i else h)
            feats.append(h)
        feats[-1] = vit.norm(h)
        return feats


class BPClassifier(nn.Module):
    """The bp baseline: backbone, T stacked transformer blocks (one head's size each), mean pooling
    and a linear classifier, trained end to end."""

    def __init__(self, backbone, num_classes, dim, heads, T):
        super().__init__()
        self.backbone = backbone
        self.layers = nn.Sequential(*[timm.models.vision_transformer.Block(dim, heads, qkv_bias=True)
                                      for _ in range(T)])
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, x):
        return self.head(self.layers(self.backbone(x)[-1]).mean(1))


class TokensMLPHead(core.MLPFlowHead):
    """The residual-MLP head on the token sequence: mean-pooled (--head mlp), or flattened to [B, N * D]
    (--head flat, D.2's literal reading: predictors on [z_t, t_emb, f(x)] with global pooling omitted)."""

    def __init__(self, flat, *args):
        super().__init__(*args)
        self.flat = flat

    def forward(self, z, tokens, t, u=None):
        return super().forward(z, tokens.flatten(1) if self.flat else tokens.mean(1), t, u)


def build_model(args, num_classes, in_ch):
    """The model of this script for `args` (analyze.py rebuilds checkpoints through this)."""
    backbone = ViTBackbone(args.img_size, args.patch, in_ch, args.dim, args.depth, args.heads, args.stem)
    if args.method == "bp":
        return BPClassifier(backbone, num_classes, args.dim, args.heads, args.T)
    if args.method == "ff":
        return core.ForwardForward(backbone, num_classes, "cff", args.dim, args.dim)
    maps = args.objective == "flowmap"
    feat_dim = (args.img_size // args.patch) ** 2 * args.dim if args.head == "flat" else args.dim
    heads = [core.TokenFlowHead(args.dim, args.dim, args.heads, dropout=args.dropout, maps=maps) if args.head == "token"
             else TokensMLPHead(args.head == "flat", feat_dim, args.dim, args.hidden, args.head_blocks, args.dropout, maps)
             for _ in range(args.T)]
    return core.FlowClassifier(backbone, heads, num_classes, args.dim, None, args.dim, guard=not args.no_guard,
                               objective=args.objective, span=args.span)


# ---- Training and evaluation ---------------------------------------------------------------------
def train_step(model, forward, batch, heads, noise_key, args, device):
    """One batch (x, y, index), no optimiser step: core.classifier_step with this run's recipe flags.
    forward: the DDP wrapper under torchrun, else None."""
    x, y, index = batch
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd, fused=device.type == "cuda")
    passes = core.head_schedule(args.T, args.method == "fm" and args.mode == "sequential")
    steps = core.steps_per_pass(train_set, args.bs, args.seed, args.max_steps) * len(passes)
    scheduler = core.warmup_cosine(optimizer, args.warmup * steps, args.epochs * steps)
    ema = core.make_ema(model, args.ema, args.ema_bn) if args.ema > 0 else None
    if args.compile:
        core.compile_model(model)
    if core.is_main():  # once data and model are built, so a bad input stops with its error line alone
        print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
        print(f"{args.method} on {args.dataset}: ViT[{args.dim} {args.depth} {args.heads}] T={args.T} mode={args.mode} "
              f"params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M device={device}")
    ks = core.topk_for(num_classes)
    evaluate = {name: functools.partial(core.evaluate_classifier, loader=loader, device=device, seed=args.seed,
                                        amp=args.amp, ks=ks) for name, loader in loaders.items()}
    extra = {"num_classes": num_classes, "in_ch": in_ch}
    return run(args, model, optimizer, scheduler, ema, train_set, passes,
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
