"""DFM fine-tuning of a pretrained ViT with flow heads (paper Section 5.3, Table 2, D.2 "Pre-trained
Fine-Tuning").

Setup (paper defaults): timm vit_base_patch16_224.augreg_in1k (ImageNet-1k only; timm's bare
vit_base_patch16_224 resolves to augreg2_in21k_ft_in1k, pretrained on ImageNet-21k, so the tag is
explicit; the run prints and the checkpoint stores the weights it loaded), classification head
removed; its unpooled output token sequence (class token + patches, after the final norm) feeds
T = 4 independent token flow heads (core.TokenFlowHead: one transformer block each, so the 4 heads
match the bp baseline's 4 encoder layers in capacity). Loss per head: flow-matching MSE + CE on the
t = 1 estimate, with core's block-wise step. AdamW with differential learning rates (backbone 1e-6,
heads 1e-4; ImageNet-R heads 1e-3), gradient clipping 1.0. CIFAR-10: 20 epochs, batch 32; CIFAR-100:
10 epochs, batch 32; ImageNet-R: 50 epochs, batch 64 (an ImageFolder tree split 80/20 with a fixed
seed); images resized to 224.

Where the paper is silent: weight decay 1e-4 and a cosine schedule without warmup (D.2's from-scratch
optimiser, minus the warmup a pretrained backbone does not need); the same for bp. With
--no-pretrained the backbone starts from random weights and its lr defaults to the heads' lr (a
random backbone at 1e-6 would not learn).

--method bp: the same backbone, 4 standard transformer encoder layers (timm Blocks of the same
width), mean pooling and a linear classifier, trained end to end with the same lrs and schedule.

Weights: --pretrained (default) uses timm's own download; --weights FILE loads a local .safetensors
or .pth state dict (offline); --no-pretrained starts from random init (then --img-size, --patch and
--depth apply, also to a --weights file, whose shapes must then match). A weights file whose keys or
shapes do not fit stops with one line naming them.

Offline run (measured numbers in README.md):
    python finetune_vit.py --dataset digits --model vit_tiny_patch16_224 --no-pretrained --out runs/ft_digits.pt
digits is not a paper setup. From random init it defaults to 16 px images, 4 px patches and 4 blocks,
30 epochs at lr 1e-3 (backbone too), and for fm t ~ u^2 ('early') with lam 3: with the paper's
uniform t and lam 1 the randomly initialised ViT learned far slower under fm than under bp (README).
"""
import argparse
import logging
import os
import sys

import timm
import torch
import torch.nn as nn
from torchvision.transforms import v2

import core

# per dataset (paper D.2): epochs, batch size, head lr; digits is an offline CPU config, not a paper setup
PAPER = dict(t_dist="uniform", lam=1.0)
SETUPS = {
    "cifar10": dict(epochs=20, bs=32, lr=1e-4, warmup=0, **PAPER),
    "cifar100": dict(epochs=10, bs=32, lr=1e-4, warmup=0, **PAPER),
    "imagenet-r": dict(epochs=50, bs=64, lr=1e-3, warmup=0, **PAPER),
    # from random init on CPU; t ~ u^2 and lam 3 measured in README ("Fine-tuning on digits")
    "digits": dict(epochs=30, bs=64, lr=1e-3, warmup=2, t_dist="early", lam=3.0),
}
# digits from random init (no --weights): a 4-block ViT on 16 px images in 4 px patches unless given
DIGITS_SCRATCH = dict(img_size=16, patch=4, depth=4)
NUM_CLASSES_HINT = {"cifar10": 10, "cifar100": 100, "imagenet-r": 200, "digits": 10}


def get_args_parser(add_help=True):
    p = argparse.ArgumentParser("DFM fine-tuning of a pretrained ViT", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--dataset", default="cifar100", choices=list(SETUPS), help="dataset (digits: offline)")
    p.add_argument("--data", default="data", help="dataset root (ImageNet-R: DIR/imagenet-r/<class>/*.jpg)")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    # method
    p.add_argument("--method", default="fm", choices=["fm", "bp"], help="flow heads, or 4 encoder layers end to end")
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential"], help="block-wise schedule")
    p.add_argument("--T", type=int, default=4, help="flow heads (bp: encoder layers)")
    p.add_argument("--time-split", action="store_true", help="head k trains on t in [k/T, (k+1)/T) only")
    p.add_argument("--sigma-min", type=float, default=0.0, help="Lipman OT path sigma_min (0 = paper)")
    p.add_argument("--t-dist", default="uniform", choices=["uniform", "early", "zero"],
                   help="t in training: U[0,1] (paper), u^2 (more weight near t=0) or 0")
    p.add_argument("--lam", type=float, default=1.0, help="weight of the CE on the t = 1 estimate (paper 1)")
    p.add_argument("--mse", default="mean", choices=["mean", "sum"], help="flow MSE reduction over latent dims")
    p.add_argument("--no-guard", action="store_true", help="disable the class-embedding collapse guard")
    # model and weights
    p.add_argument("--model", default="vit_base_patch16_224.augreg_in1k",
                   help="any timm ViT, with its pretrained tag (default: ImageNet-1k only, as D.2; timm's bare "
                        "vit_base_patch16_224 resolves to ImageNet-21k pretraining, augreg2_in21k_ft_in1k)")
    p.add_argument("--pretrained", dest="pretrained", action="store_true", default=True,
                   help="timm's pretrained weights for --model, downloaded when online")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random init")
    p.add_argument("--weights", default=None, help="local .safetensors or .pth state dict of the backbone")
    p.add_argument("--img-size", type=int, default=None, help="input size (random init or --weights; else the model's)")
    p.add_argument("--patch", type=int, default=None, help="patch size (random init or --weights)")
    p.add_argument("--depth", type=int, default=None,
                   help="transformer blocks (random init or --weights; else the model's; digits from scratch 4)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in the heads")
    p.add_argument("--feat-norm", default="none", choices=["none", "batch"],
                   help="batch: standardise the token features per channel (BatchNorm, no affine) before the heads")
    # optimisation
    p.add_argument("--epochs", type=int, default=10, help="epochs (paper: CIFAR-10 20, CIFAR-100 10, ImageNet-R 50)")
    p.add_argument("--bs", type=int, default=32, help="batch size (paper: CIFAR 32, ImageNet-R 64)")
    p.add_argument("--lr", type=float, default=1e-4, help="lr of heads / bp layers (paper 1e-4; ImageNet-R 1e-3)")
    p.add_argument("--lr-backbone", type=float, default=1e-6, help="backbone lr (paper 1e-6; heads' lr if random init)")
    p.add_argument("--wd", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup epochs before cosine (paper: none)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping max norm")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    # run
    p.add_argument("--seed", type=int, default=0, help="random seed (also seeds evaluation noise)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--out", default="run.pt", help="checkpoint path; the JSON-lines log goes beside it")
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument("--final", action="store_true",
                   help="train on train + validation (once the choices are made) and report test; no val_ metrics")
    p.add_argument("--test-every-epoch", action="store_true",
                   help="log the test metrics every epoch (for curves); default: after the last epoch only")
    p.add_argument("--max-steps", type=int, default=0, help="stop each epoch after this many steps (smoke tests)")
    return p


def parse_args(argv=None):
    """Flags, with the --dataset setup as real argparse defaults: a first pass reads --dataset and the
    weights flags (abbreviations included), set_defaults applies the setup (digits from random init:
    its small ViT), a second pass reads --lr, and the backbone lr defaults to 1e-6 with pretrained
    weights or to the heads' lr from random init. A flag the user typed always wins; --help shows
    what the run will use."""
    first, _ = get_args_parser(add_help=False).parse_known_args(argv)
    defaults = dict(SETUPS[first.dataset])
    scratch = not (first.pretrained or first.weights)
    if first.dataset == "digits" and scratch:
        defaults.update(DIGITS_SCRATCH)
    second = get_args_parser(add_help=False)
    second.set_defaults(**defaults)
    lr = second.parse_known_args(argv)[0].lr
    parser = get_args_parser()
    parser.set_defaults(**defaults, lr_backbone=lr if scratch else 1e-6)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class WeightsError(RuntimeError):
    """Weights that cannot be had or do not fit; one-line message."""


def load_state_file(path):
    """A state dict from .safetensors or a torch file (weights_only); a wrapping {'model': ...} or
    {'state_dict': ...} is unwrapped."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"cannot read weights file {path} ({type(e).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds no state dict")
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
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise WeightsError(f"timm has no model {name!r}") from None
            raise WeightsError(f"cannot get pretrained weights for {name} ({type(e).__name__}: offline?); pass "
                               f"--weights FILE (.safetensors or .pth) or --no-pretrained") from None
        except Exception as e:  # network errors from the hub
            raise WeightsError(f"cannot get pretrained weights for {name} ({type(e).__name__}: offline?); pass "
                               f"--weights FILE (.safetensors or .pth) or --no-pretrained") from None
        if weights:
            state = {k: v for k, v in load_state_file(weights).items() if not k.startswith(("head.", "fc_norm.head"))}
            own = self.vit.state_dict()
            missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
            shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
            if missing or unexpected or shapes:
                raise WeightsError(f"{weights} does not fit {name}: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                                   f"wrong shape {shapes[:4]}")
            self.vit.load_state_dict(state)
        cfg = self.vit.pretrained_cfg or {}
        # what the weights are, for the log: timm's architecture.tag, the file, or random init
        self.source = (f"timm {cfg.get('architecture', name)}.{cfg.get('tag')}" if download else
                       f"file {weights}" if weights else "random init")
        self.dim = self.vit.embed_dim
        self.heads_hint = self.vit.blocks[0].attn.num_heads
        self.mean, self.std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
        self.img_size = self.vit.patch_embed.img_size[0]
        self.feat_norm = nn.BatchNorm1d(self.dim, affine=False) if feat_norm == "batch" else None

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
    backbone = ViTBackbone(args.model, args.pretrained, args.weights, args.img_size, args.patch,
                           getattr(args, "depth", None), getattr(args, "feat_norm", "none"))
    if args.method == "bp":
        return BPClassifier(backbone, num_classes, args.T)
    heads = [core.TokenFlowHead(backbone.dim, backbone.dim, backbone.heads_hint, dropout=args.dropout)
             for _ in range(args.T)]
    return core.FlowClassifier(backbone, heads, num_classes, backbone.dim, None, backbone.dim, guard=not args.no_guard)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def build_data(args, backbone):
    size = backbone.img_size
    if args.dataset == "digits":  # tensors [1, 8, 8] -> 3 channels at the model's input size
        to = [v2.Resize(size, antialias=True), v2.Lambda(lambda x: x.expand(3, -1, -1)),
              v2.Normalize(backbone.mean, backbone.std)]
        train_tf = v2.Compose([v2.RandomAffine(0, translate=(0.1, 0.1))] + to)
        test_tf = v2.Compose(to)
    else:
        to = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(backbone.mean, backbone.std)]
        train_tf = v2.Compose([v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()] + to)
        test_tf = v2.Compose([v2.Resize((size, size), antialias=True)] + to)
    train, val, test, num_classes = core.classification_data(args.dataset, args.data, train_tf, test_tf,
                                                             val=not getattr(args, "final", False))
    val = core.WithIndex(val) if val is not None else None
    return core.Seeded(core.WithIndex(train), args.seed), val, core.WithIndex(test), num_classes


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
        model = build_model(args, NUM_CLASSES_HINT[args.dataset])
        train_set, val_set, test_set, num_classes = build_data(args, model.backbone)
    except (WeightsError, core.DataError) as e:
        sys.exit(f"error: {e}")
    if num_classes != NUM_CLASSES_HINT[args.dataset]:  # e.g. an ImageNet-R subset with fewer classes
        core.seed_everything(args.seed)
        model = build_model(args, num_classes)
    model = model.to(device)
    if args.dataset == "digits":
        args.workers = 0  # in-memory tensors: worker processes only add start-up time
    loaders = {name: torch.utils.data.DataLoader(core.shard(data), 2 * args.bs, shuffle=False, num_workers=args.workers,
                                                 pin_memory=device.type == "cuda")
               for name, data in (("val", val_set), ("test", test_set)) if data is not None}

    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    optimizer = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in ids], "lr": args.lr},
                                   {"params": backbone, "lr": args.lr_backbone}], weight_decay=args.wd)
    steps = core.steps_per_epoch(train_set, args)
    scheduler = core.warmup_cosine(optimizer, args.warmup * steps, args.epochs * steps)
    if core.is_main():  # once data and model are built, so a bad input stops with its error line alone
        print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)
    if core.is_main():
        print(f"{args.method} fine-tuning {args.model} ({model.backbone.source}) on {args.dataset}: T={args.T} mode={args.mode} "
              f"params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M device={device}")
    arch = ("final", "method", "model", "T", "dataset", "img_size", "patch", "depth", "feat_norm", "no_guard")

    def evaluate(split):  # validation every epoch, test at the end (core.fit); None without that split
        ks = core.topk_for(num_classes)
        return (lambda m: core.evaluate_classifier(m, loaders[split], device, args.seed, args.amp, ks)) \
            if split in loaders else None

    return core.fit(args, os.path.basename(__file__), arch, model, optimizer, scheduler, train_set,
                    lambda m, fwd, b, heads, key: train_step(m, b[0], b[1], heads, args, device, fwd, b[2], key),
                    evaluate("val"),
                    lambda r: core.classification_summary(r) + f" peak step memory {r['peak_step_bytes'] / 2**20:.1f} MiB",
                    extra_state={"num_classes": num_classes, "weights": model.backbone.source},
                    test=evaluate("test"))


if __name__ == "__main__":
    main(parse_args())
