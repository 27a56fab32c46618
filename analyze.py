"""The paper's analyses from checkpoints of the four training scripts, as JSON, tables and plots.

    python analyze.py --ckpt run.pt --probe                          # linear probe on frozen features
    python analyze.py --ckpt run.pt --inference --noise-seeds 5      # Table 3 (+ 2T, 4T steps, Heun)
    python analyze.py --ckpt fm.pt --ckpt bp.pt --ckpt ff.pt --geometry  # Figure 5: ID and spread per stage
    python analyze.py --ckpt run.pt --refinement                     # Figure 6: metric after each Euler step
    python analyze.py --ckpt run.pt --grad-variance                  # Figure 7 / Proposition 3, T = 4 and 6
    python analyze.py --ckpt fm.pt --ckpt bp.pt --curves             # Figures 2 and 4 from the JSON-lines logs
    python analyze.py --memory --script train_det_voc.py --backbone resnet18 --img-size 64   # Figure 3

A checkpoint names the script that wrote it; the model is rebuilt with that script's build_model
and the args stored in the checkpoint. Each mode writes <mode>.json and PNGs into --outdir
(default: a folder `analysis` beside the first checkpoint) and prints a table. --memory needs no
checkpoint: it builds models of --script for each of --methods (fm,bp) (extra flags go to that script's parser) for
T in {4, 8, 16, 20, 24} at batch 8 and measures one training step of each.
"""
import argparse
import importlib
import inspect
import json
import os
import statistics
import sys
import time

import matplotlib
import matplotlib.ticker
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import core

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CLASSIFICATION = ("train_cls_cnn.py", "train_cls_vit.py", "finetune_vit.py")


def get_args_parser():
    p = argparse.ArgumentParser("DFM analyses", add_help=True)
    p.add_argument("--ckpt", action="append", default=[], help="checkpoint (repeat to compare runs)")
    p.add_argument("--outdir", default=None, help="output folder (default: analysis/ beside the first checkpoint)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--bs", type=int, default=256, help="evaluation batch size")
    p.add_argument("--limit", type=int, default=0, help="use only the first N test (and probe-train) samples")
    # modes
    p.add_argument("--probe", action="store_true", help="linear probe on frozen backbone features")
    p.add_argument("--inference", action="store_true", help="Table 3: per-head, ensemble, Euler T/2T/4T, Heun")
    p.add_argument("--geometry", action="store_true", help="intrinsic dimension and spread per backbone stage")
    p.add_argument("--refinement", action="store_true", help="task metric after each Euler step")
    p.add_argument("--grad-variance", action="store_true", help="per-block gradient variance, fm vs bp, T = 4, 6")
    p.add_argument("--curves", action="store_true", help="training curves from the runs' JSON-lines logs")
    p.add_argument("--memory", action="store_true", help="peak step memory and time vs T, per --methods (fm vs bp)")
    p.add_argument("--speed", action="store_true",
                   help="training images/s of fm and bp for every paper setup of every script (random data), with "
                        "parameters and FLOPs per image; extra flags (--amp, --compile, --channels-last) go to the scripts")
    # mode options
    p.add_argument("--probe-epochs", type=int, default=200, help="full-batch epochs of the probe")
    p.add_argument("--probe-lr", type=float, default=1e-2, help="probe learning rate")
    p.add_argument("--probe-opt", default="adamw", choices=["adamw", "lbfgs"], help="probe optimiser")
    p.add_argument("--probe-dataset", default=None,
                   help="probe on this dataset of the run's script instead of the run's own (e.g. a pretraining "
                        "source's backbone on the fine-tuning target: --probe-dataset digits), its --data from --data")
    p.add_argument("--data", default=None, help="--probe-dataset: its dataset root (default: the run's --data)")
    p.add_argument("--noise-seeds", type=int, default=3, help="z0 draws for --inference (mean +- std)")
    p.add_argument("--solver", default="heun", choices=["heun", "midpoint"], help="second-order solver")
    p.add_argument("--grad-batches", type=int, default=8, help="mini-batches for --grad-variance")
    p.add_argument("--var-threshold", type=float, default=0.9, help="PCA variance fraction for the ID")
    p.add_argument("--script", default="train_det_voc.py", help="--memory: the training script to measure")
    p.add_argument("--Ts", default="4,8,16,20,24", help="--memory: numbers of blocks")
    p.add_argument("--methods", default="fm,bp", help="--memory: the methods to measure (e.g. fm,bp,ff,noprop)")
    p.add_argument("--mem-bs", type=int, default=8, help="--memory: batch size")
    p.add_argument("--speed-bs", type=int, default=None,
                   help="--speed: batch size (default: 8 on CPU, the setup's own on CUDA; ViT-B/16 and ResNet-50 at "
                        "most 4 on CPU)")
    p.add_argument("--speed-T", default=None, help="--speed: comma-separated T values (default: each setup's own)")
    p.add_argument("--speed-setups", default=None,
                   help="--speed: only these, e.g. train_cls_cnn.py:cifar10,train_det_voc.py:voc2007")
    p.add_argument("--speed-steps", type=int, default=5,
                   help="--speed: timed steps of fm and of bp, alternating, after 2 warm-up steps each")
    return p


# ---- Metric functions (pure; tested in test_core.py) ---------------------------------------------
def intrinsic_dimension(features, threshold=0.9):
    """Number of principal components needed to explain `threshold` of the variance. features [N, F]."""
    x = features.double() - features.double().mean(0)
    var = torch.linalg.svdvals(x) ** 2
    ratio = torch.cumsum(var, 0) / var.sum()
    return int((ratio < threshold - 1e-12).sum()) + 1


def feature_spread(features):
    """Mean pairwise cosine distance 1 - cos(x_i, x_j) over pairs i != j. features [N, F]."""
    x = F.normalize(features.double(), dim=1)
    n = len(x)
    sim = x @ x.T
    return float((n * n - sim.sum()) / (n * (n - 1)))  # sum over i != j of (1 - cos); diagonal is 1 - 1 = 0


def linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=200, lr=1e-2, opt="adamw", ks=(1, 5), seed=0):
    """Full-batch linear classifier on standardised frozen features; returns test top-k accuracies."""
    torch.manual_seed(seed)
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(xtr.shape[1], num_classes)
    if opt == "lbfgs":
        optimizer = torch.optim.LBFGS(probe.parameters(), lr=1.0, max_iter=epochs, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(xtr), train_y) + 1e-4 * probe.weight.pow(2).sum()
            loss.backward()
            return loss
        optimizer.step(closure)
    else:
        optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=1e-4)
        for _ in range(epochs):
            optimizer.zero_grad()
            F.cross_entropy(probe(xtr), train_y).backward()
            optimizer.step()
    with torch.no_grad():
        hits = core.topk_correct(probe(xte), test_y, ks)
    return {("top1" if k == 1 else f"top{k}"): h / len(test_y) for k, h in zip(ks, hits)}


def flat_grad(module):
    """All parameter gradients of `module` as one flat CPU vector, zeros for a parameter without one
    (built on the parameter's own device, so CUDA gradients and the zeros concatenate)."""
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
                      for p in module.parameters()]).cpu()


def grad_variance(grads):
    """Mean over parameters of the variance across mini-batches. grads: list of flat [P] tensors."""
    g = torch.stack(grads).double()
    return float(g.var(0, unbiased=True).mean())


# ---- Rebuilding runs -----------------------------------------------------------------------------
class Run:
    """A checkpoint rebuilt: the script module, its args, the model (weights loaded, eval mode) and data."""

    def __init__(self, path, device):
        state = core.load_checkpoint(path)
        self.path, self.device = path, device
        self.script = state.get("script")
        if self.script not in CLASSIFICATION + ("train_det_voc.py",):
            raise core.CheckpointError(f"{path} was written by {self.script!r}, which analyze.py does not know")
        self.module = importlib.import_module(self.script[:-3])
        missing = sorted(set(vars(self.module.get_args_parser().parse_args([]))) - set(state["args"]))
        if missing:  # a flag added since: the run's value of it is unknown
            raise core.CheckpointError(f"{path} was written by an older {self.script}, without --"
                                       f"{', --'.join(m.replace('_', '-') for m in missing)}; analyze it with that version")
        self.args = argparse.Namespace(**state["args"])
        self.args.device = str(device)
        self.kind = "det" if self.script == "train_det_voc.py" else "cls"
        # never download: the checkpoint holds every weight
        for key, value in (("pretrained", False), ("weights", None), ("no_pretrained", True)):
            if hasattr(self.args, key):
                setattr(self.args, key, value)
        self.num_classes, self.in_ch = state["num_classes"], state.get("in_ch")
        self.model = self.build(self.args)
        if state.get("ema"):  # the weights the run evaluated and reported (AveragedModel keys: module.*)
            self.model.load_state_dict({k[7:]: v for k, v in state["ema"].items() if k.startswith("module.")})
        else:
            self.model.load_state_dict(state["model"])
        self.model.to(device).eval()
        self.log = os.path.splitext(path)[0] + ".jsonl"

    def build(self, args):
        """The script's model for `args` (the classification scripts also take the input channels)."""
        extra = [self.in_ch] if "in_ch" in inspect.signature(self.module.build_model).parameters else []
        return self.module.build_model(args, self.num_classes, *extra)

    def data(self, dataset=None, root=None):
        """(train, test) with the test transform on both (no augmentation for frozen features); of `dataset`
        under `root` instead of the run's own data when given."""
        if dataset:
            self.args = argparse.Namespace(**{**vars(self.args), "dataset": dataset, "data": root or self.args.data})
        if self.script == "finetune_vit.py":
            train, _, test, _ = self.module.build_data(self.args, self.model.backbone)
        elif self.kind == "det":
            train, _, test, _ = self.module.build_data(self.args)
            train.dataset.transform = test.transform  # train is core.Seeded(VOCData)
            return train, test
        else:
            train, _, test = self.module.build_data(self.args)[:3]
        def reader(dataset):  # under the Seeded / WithIndex / Subset wrappers, the dataset that transforms
            while not hasattr(dataset, "transform") and hasattr(dataset, "dataset"):
                dataset = dataset.dataset
            return dataset
        reader(train).transform = reader(test).transform
        return train, test

    def loader(self, dataset, bs, limit=0):
        if limit:
            dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
        kw = {"collate_fn": self.module.collate} if self.kind == "det" else {}
        return torch.utils.data.DataLoader(dataset, bs, shuffle=False, num_workers=0, **kw)

    @property
    def is_fm(self):
        return self.args.method == "fm"

    @property
    def topk(self):
        return {"cifar100": 5, "tinyimagenet": 10}.get(self.args.dataset, 5)


@torch.no_grad()
def stage_features(run, loader):
    """Pooled features of every backbone stage and the labels: ([N, F_s] per stage, [N])."""
    feats, labels = None, []
    for x, y, _ in loader:
        x = x[:, 0] if x.dim() == 5 else x  # CFF's training set holds two views of each image: the first
        out = [core.pool(f).float().cpu() for f in run.model.backbone(x.to(run.device))]
        feats = [[] for _ in out] if feats is None else feats
        for store, f in zip(feats, out):
            store.append(f)
        labels.append(y)
    return [torch.cat(f) for f in feats], torch.cat(labels)


# ---- Modes ---------------------------------------------------------------------------------------
def mode_probe(runs, args):
    rows = []
    for run in runs:
        if run.kind != "cls":
            continue
        known = next(a.choices for a in run.module.get_args_parser()._actions if a.dest == "dataset")
        if args.probe_dataset and args.probe_dataset not in known:
            raise core.DataError(f"--probe-dataset {args.probe_dataset}: {run.script} knows {', '.join(known)}")
        train, test = run.data(args.probe_dataset, args.data)
        (ftr, ytr), (fte, yte) = (stage_features(run, run.loader(d, args.bs, args.limit)) for d in (train, test))
        classes = int(max(ytr.max(), yte.max())) + 1  # the probed data's classes (--probe-dataset: not the run's)
        acc = linear_probe(ftr[-1], ytr, fte[-1], yte, classes, args.probe_epochs, args.probe_lr, args.probe_opt,
                           ks=(1, run.topk))
        rows.append({"ckpt": run.path, "method": run.args.method, "dataset": run.args.dataset, **acc})
        print(f"probe  {run.path} on {run.args.dataset}: top-1 {acc['top1']:.4f}  top-{run.topk} "
              f"{acc[f'top{run.topk}']:.4f}")
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = np.arange(len(rows))
    ax.bar(xs - 0.2, [r["top1"] for r in rows], 0.4, label="top-1")
    ax.bar(xs + 0.2, [next(v for k, v in r.items() if k.startswith("top") and k != "top1") for r in rows], 0.4,
           label="top-k")
    ax.set_xticks(xs, [f"{os.path.basename(r['ckpt'])} ({r['method']})" for r in rows])
    ax.set_xlabel("checkpoint")
    ax.set_ylabel("linear probe test accuracy")
    ax.set_title("Linear probe on frozen backbone features")
    ax.legend()
    return rows, fig


STEPS = (1, 2, 4, 8, 16)  # --inference: accuracy and time against the number of steps


@torch.no_grad()
def flow_accuracies(run, loader, seed, solver):
    """Top-1 / top-k of every inference mode for one z0 draw (seed), the seconds each step count took, and each
    step count's drift: the mean over samples of ||z_n - z_1|| / ||z_1 - z0||, z_n the endpoint after n steps (0
    for exact maps or a straight field: the semigroup holds). Velocity heads: each head's single step, the
    ensemble, Euler with T / 2T / 4T steps, the 2nd-order solver, and Euler with n steps for n in STEPS; flow-map
    heads: each head's one-step map, the ensemble and core.compose with n steps."""
    model, T, ks = run.model, run.model.T, (1, run.topk)
    maps = getattr(model, "objective", "velocity") == "flowmap"
    names = [f"head{k}" for k in range(T)] + ["ensemble"] + \
        ([] if maps else ["euler_T", "euler_2T", "euler_4T", f"{solver}_T"]) + [f"steps_{n}" for n in STEPS]
    hits, seconds, drift, n_seen = {name: [0, 0] for name in names}, {n: 0.0 for n in STEPS}, {n: 0.0 for n in STEPS}, 0
    for x, y, idx in loader:
        x, y = x.to(run.device), y.to(run.device)
        with torch.no_grad():
            feats = model.backbone(x)
        z0 = core.noise_for(idx, (model.dim,), seed, run.device)
        velocity = lambda k, z, t: model.velocity(k, z, feats, t).float()  # noqa: E731
        mapping = lambda k, z, t, u: model.flow_map(k, z, feats, t, u).float()  # noqa: E731
        if maps:
            zero, one = torch.zeros(len(z0), device=run.device), torch.ones(len(z0), device=run.device)
            with torch.no_grad():
                singles = [mapping(k, z0, zero, one) for k in range(T)]
        else:
            singles = [core.single_step(velocity, z0, k) for k in range(T)]
        latents = dict(zip(names[:T], singles))
        latents["ensemble"] = torch.stack(singles).mean(0)
        if not maps:
            for mult in (1, 2, 4):
                latents[f"euler_{'' if mult == 1 else mult}T"] = core.integrate(velocity, z0, T, mult * T)
            latents[f"{solver}_T"] = core.integrate(velocity, z0, T, T, method=solver)
        for n in STEPS:
            start = time.perf_counter()
            latents[f"steps_{n}"] = core.compose(mapping, z0, T, n, model.span) if maps else \
                core.integrate(velocity, z0, T, n)
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)
            seconds[n] += time.perf_counter() - start
            one = latents["steps_1"]
            drift[n] += ((latents[f"steps_{n}"] - one).norm(dim=1) / (one - z0).norm(dim=1)).sum().item()
        for name, z in latents.items():
            hits[name] = [a + b for a, b in zip(hits[name], core.topk_correct(model.logits(z), y, ks))]
        n_seen += len(y)
    return {name: [h / n_seen for h in v] for name, v in hits.items()}, seconds, {n: d / n_seen for n, d in drift.items()}


def mode_inference(runs, args):
    """Table 3 (every inference mode, mean +- std over z0 draws) and accuracy against the number of steps,
    velocity heads (Euler) and flow-map heads (composed maps) in one plot, with the time each took."""
    rows = []
    for run in runs:
        if run.kind != "cls" or not run.is_fm:
            print(f"inference  {run.path}: skipped, a {run.kind} {run.args.method} run (Table 3 reads fm classifiers)")
            continue
        test = run.data()[1]
        loader = run.loader(test, args.bs, args.limit)
        results = [flow_accuracies(run, loader, seed, args.solver) for seed in range(args.noise_seeds)]
        draws, times, drifts = [r[0] for r in results], [r[1] for r in results], [r[2] for r in results]
        objective = run.args.objective
        for name in draws[0]:
            top1 = np.array([d[name][0] for d in draws])
            topk = np.array([d[name][1] for d in draws])
            row = {"ckpt": run.path, "objective": objective, "mode": name, "top1_mean": float(top1.mean()),
                   "top1_std": float(top1.std()), f"top{run.topk}_mean": float(topk.mean()),
                   f"top{run.topk}_std": float(topk.std())}
            if name.startswith("steps_"):
                row["seconds"] = float(np.mean([t[int(name[6:])] for t in times]))
                row["drift"] = float(np.mean([d[int(name[6:])] for d in drifts]))
            rows.append(row)
        print(f"inference  {run.path} ({objective}, {args.noise_seeds} z0 draws)")
        for r in rows:
            if r["ckpt"] == run.path:
                extra = f"   {r['seconds']:.3f} s   drift {r['drift']:.3f}" if "seconds" in r else ""
                print(f"  {r['mode']:>10}: top-1 {r['top1_mean']:.4f} +- {r['top1_std']:.4f}   "
                      f"top-{run.topk} {r[f'top{run.topk}_mean']:.4f}{extra}")
    fig, (ax, ax_steps) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [3, 2]})
    paths = sorted({r["ckpt"] for r in rows})
    width = 0.8 / max(1, len(paths))
    for i, path in enumerate(paths):
        sub = [r for r in rows if r["ckpt"] == path and not r["mode"].startswith("steps_")]
        xs = np.arange(len(sub)) + i * width
        label = f"{os.path.basename(path)} ({sub[0]['objective']})"
        ax.bar(xs, [r["top1_mean"] for r in sub], width, yerr=[r["top1_std"] for r in sub], label=label, capsize=2)
        ax.set_xticks(np.arange(len(sub)) + 0.4 - width / 2, [r["mode"] for r in sub], rotation=45, ha="right")
        steps = [r for r in rows if r["ckpt"] == path and r["mode"].startswith("steps_")]
        ax_steps.errorbar([int(r["mode"][6:]) for r in steps], [r["top1_mean"] for r in steps],
                          yerr=[r["top1_std"] for r in steps], marker="o", capsize=2, label=label)
    ax.set_ylabel("test top-1 accuracy")
    ax.set_xlabel("inference mode")
    ax.set_title("Inference modes (mean +- std over z0 draws)")
    ax.legend()
    ax_steps.set_xscale("log", base=2)
    ax_steps.set_xlabel("steps (velocity: Euler; flowmap: composed maps)")
    ax_steps.set_ylabel("test top-1 accuracy")
    ax_steps.set_title("Accuracy against the number of steps")
    ax_steps.legend()
    return rows, fig


def mode_geometry(runs, args):
    rows = []
    for run in runs:
        if run.kind != "cls":
            continue
        feats, _ = stage_features(run, run.loader(run.data()[1], args.bs, args.limit or 2000))
        for s, f in enumerate(feats):
            rows.append({"ckpt": run.path, "script": run.script, "method": run.args.method, "stage": s + 1,
                         "intrinsic_dim": intrinsic_dimension(f, args.var_threshold), "spread": feature_spread(f)})
            print(f"geometry  {os.path.basename(run.path)} ({run.args.method}) stage {s + 1}: ID "
                  f"{rows[-1]['intrinsic_dim']:4d}  spread {rows[-1]['spread']:.4f}")
    scripts = sorted({r["script"] for r in rows})  # Figure 5: a row of two panels per architecture, every run in it
    fig, axes = plt.subplots(len(scripts), 2, figsize=(10, 4 * len(scripts)), squeeze=False)
    for row, script in zip(axes, scripts):
        for path in sorted({r["ckpt"] for r in rows if r["script"] == script}):
            sub = [r for r in rows if r["ckpt"] == path]
            label = f"{os.path.basename(path)} ({sub[0]['method']})"
            row[0].plot([r["stage"] for r in sub], [r["intrinsic_dim"] for r in sub], "o-", label=label)
            row[1].plot([r["stage"] for r in sub], [r["spread"] for r in sub], "o-", label=label)
        for ax, name in zip(row, (f"intrinsic dimension (PCA {args.var_threshold:.0%})",
                                  "feature spread (mean cosine distance)")):
            ax.set_xlabel("stage (CNN stage, ViT block; noprop: block)")
            ax.set_ylabel(name)
            ax.set_title(script)
            ax.legend(fontsize=7)
    return rows, fig


def mode_refinement(runs, args):
    rows = []
    for run in runs:
        if not run.is_fm:
            print(f"refinement  {run.path}: skipped, a {run.args.method} run (Euler steps are fm's)")
            continue
        test = run.data()[1]
        loader = run.loader(test, min(args.bs, 32) if run.kind == "det" else args.bs, args.limit)
        if run.kind == "cls":
            hits, n = None, 0
            with torch.no_grad():
                for x, y, idx in loader:
                    x, y = x.to(run.device), y.to(run.device)
                    feats = run.model.backbone(x)
                    z0 = core.noise_for(idx, (run.model.dim,), run.args.seed, run.device)
                    _, path = core.integrate(lambda k, z, t: run.model.velocity(k, z, feats, t).float(), z0, run.model.T,
                                             return_path=True)
                    step_hits = [core.topk_correct(run.model.logits(z), y, (1,))[0] for z in path]
                    hits = step_hits if hits is None else [a + b for a, b in zip(hits, step_hits)]
                    n += len(y)
            values = [h / n for h in hits]
            metric = "top1"
        else:
            det = run.module
            dets, gts = None, []
            with torch.no_grad():
                for x, targets, idx in loader:
                    decoded = det.predict(run.model, x.to(run.device), idx, run.args, return_path=True)
                    sizes = [t["size"] for t in targets]
                    per_step = [det.postprocess(lg, bx, sizes, run.args.score_thresh, run.args.nms) for lg, bx in decoded]
                    dets = per_step if dets is None else [a + b for a, b in zip(dets, per_step)]
                    gts += [{k: t[k] for k in ("boxes", "labels", "difficult")} for t in targets]
            values = [det.voc_eval(d, gts, run.num_classes)["map"] for d in dets]
            metric = "map50"
        for step, value in enumerate(values, 1):
            rows.append({"ckpt": run.path, "step": step, metric: value})
        print(f"refinement  {os.path.basename(run.path)}: " + "  ".join(f"step {i}: {v:.4f}" for i, v in enumerate(values, 1)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for path in sorted({r["ckpt"] for r in rows}):
        sub = [r for r in rows if r["ckpt"] == path]
        key = "top1" if "top1" in sub[0] else "map50"
        ax.plot([r["step"] for r in sub], [r[key] for r in sub], "o-", label=f"{os.path.basename(path)} ({key})")
    ax.set_xlabel("Euler step (latent decoded after the step)")
    ax.set_ylabel("test metric")
    ax.set_title("Progressive refinement")
    ax.legend()
    return rows, fig


def block_modules(model):
    """The T post-backbone blocks: flow heads (fm) or stacked layers (bp)."""
    return list(model.heads) if hasattr(model, "heads") else list(model.layers)


def mode_grad_variance(runs, args):
    """Per-block gradient variance across mini-batches for fresh fm and bp models of the checkpoint's
    script at T = 4 and 6, their backbones initialised from the checkpoint (Proposition 3, Fig. 7)."""
    rows = []
    run = runs[0]
    train = run.data()[0]
    loader = run.loader(train, 16 if run.kind == "det" else 64)
    batches = [b for _, b in zip(range(args.grad_batches), loader)]
    backbone_state = {k: v for k, v in run.model.state_dict().items() if k.startswith("backbone.")}
    for T in (4, 6):
        for method in ("fm", "bp"):
            margs = argparse.Namespace(**{**vars(run.args), "T": T, "method": method, "mode": "parallel"})
            torch.manual_seed(0)
            model = run.build(margs).to(run.device)
            model.load_state_dict(backbone_state, strict=False)
            model.train()
            grads = [[] for _ in range(T)]
            for x, y, _ in batches:
                model.zero_grad(set_to_none=True)
                run.module.train_step(model, None, (x, y, None), list(range(T)), None, margs, run.device)
                for k, block in enumerate(block_modules(model)):
                    grads[k].append(flat_grad(block))
            for k in range(T):
                rows.append({"T": T, "method": method, "block": k + 1, "grad_var": grad_variance(grads[k])})
            first, last = rows[-T]["grad_var"], rows[-1]["grad_var"]
            print(f"grad-variance  T={T} {method}: block 1 / block {T} = {first / max(last, 1e-30):.3f}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, T in zip(axes, (4, 6)):
        for method in ("fm", "bp"):
            sub = [r for r in rows if r["T"] == T and r["method"] == method]
            ax.semilogy([r["block"] for r in sub], [r["grad_var"] for r in sub], "o-", label=method)
        ax.set_xlabel("block")
        ax.set_ylabel("gradient variance (mean over parameters)")
        ax.set_title(f"T = {T}")
        ax.legend()
    return rows, fig


def mode_curves(runs, args):
    rows = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run_path in [r.path for r in runs]:
        log = os.path.splitext(run_path)[0] + ".jsonl"
        records = [json.loads(line) for line in open(log) if line.strip()]
        # validation every epoch (runs before the val split: the test metrics they logged every epoch)
        metric = next(m for m in ("val_map50", "val_acc_ensemble", "val_acc", "map50", "acc_ensemble", "acc")
                      if m in records[0])
        label = os.path.basename(run_path)
        axes[0].plot([r["epoch"] for r in records], [r[metric] for r in records], "o-", ms=3, label=f"{label} ({metric})")
        axes[1].plot([r["epoch"] for r in records], [r["loss"] for r in records], "o-", ms=3, label=label)
        rows += [{"ckpt": run_path, "epoch": r["epoch"], "metric": metric, "value": r[metric], "loss": r["loss"]}
                 for r in records]
        print(f"curves  {label}: {len(records)} epochs, last {metric} {records[-1][metric]:.4f}")
    axes[0].set_ylabel("validation metric")
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend()
    return rows, fig


def fake_batch(module, margs, bs, device):
    """A batch of the script's input format: images and labels (classification) or targets (detection)."""
    g = torch.Generator().manual_seed(0)
    if module.__name__ == "train_det_voc":
        x = torch.randn(bs, 3, margs.img_size, margs.img_size, generator=g)
        targets = []
        for _ in range(bs):
            n = 4
            cxcy, wh = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.2 + 0.1
            targets.append({"labels": torch.randint(0, 20, (n,), generator=g), "boxes_norm": torch.cat([cxcy, wh], 1)})
        return x.to(device), targets, 20
    size = margs.img_size or (224 if module.__name__ == "finetune_vit" else  # ViT-B/16's own input size
                              getattr(module, "IMG_SIZE", {}).get(margs.dataset, 32))
    in_ch = 1 if margs.dataset in ("digits", "mnist") and module.__name__ != "finetune_vit" else 3  # ViT-B: RGB
    return torch.randn(bs, in_ch, size, size, generator=g).to(device), torch.randint(0, 10, (bs,), generator=g).to(device), 10


def random_setup(module, argv, bs, device):
    """(args, model, x, y) for --memory and --speed: `module`'s flags from argv (with --no-pretrained where the
    script loads weights and --weights is not given: random data, nothing downloaded), a random batch of bs on
    `device`, and the script's model, seeded, in train mode."""
    if module.__name__ in ("train_det_voc", "finetune_vit") and "--weights" not in argv:
        argv = argv + ["--no-pretrained"]
    margs = module.parse_args(argv)
    x, y, classes = fake_batch(module, margs, bs, device)
    in_ch = [x.shape[1]] if "in_ch" in inspect.signature(module.build_model).parameters else []
    torch.manual_seed(0)
    return margs, module.build_model(margs, classes, *in_ch).to(device).train(), x, y


def mode_memory(args, extra, device):
    module = importlib.import_module(os.path.basename(args.script)[:-3])
    rows, methods = [], args.methods.split(",")
    for method in methods:
        for T in [int(t) for t in args.Ts.split(",")]:
            margs, model, x, y = random_setup(module, extra + ["--method", method, "--T", str(T), "--mode", "parallel"],
                                              args.mem_bs, device)
            step = lambda m: module.train_step(m, None, (x, y, None), list(range(T)), None, margs, device)  # noqa: E731
            peak = core.measure_step_memory(step, model, device)
            step(model)  # warm-up, then time the median of three steps
            times = []
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                step(model)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            rows.append({"script": os.path.basename(args.script), "method": method, "T": T, "peak_bytes": peak,
                         "step_seconds": float(np.median(times))})
            print(f"memory  {method} T={T:2d}: peak {peak / 2**20:8.1f} MiB   step {rows[-1]['step_seconds']:.3f} s")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        sub = [r for r in rows if r["method"] == method]
        axes[0].plot([r["T"] for r in sub], [r["peak_bytes"] / 2**20 for r in sub], "o-", label=method)
        axes[1].plot([r["T"] for r in sub], [r["step_seconds"] for r in sub], "o-", label=method)
    what = "CUDA peak" if device.type == "cuda" else "saved activations"
    axes[0].set_ylabel(f"peak training-step memory, MiB ({what})")
    axes[1].set_ylabel("step time, s")
    for ax in axes:
        ax.set_xlabel("number of blocks T")
        ax.legend()
    fig.suptitle(f"{os.path.basename(args.script)}, batch {args.mem_bs}")
    return rows, fig


# every paper setup of every script (Appendix D)
SPEED_SETUPS = [("train_cls_cnn.py", d) for d in ("cifar10", "cifar100", "mnist", "tinyimagenet")] + \
    [("train_cls_vit.py", d) for d in ("cifar10", "cifar100", "mnist", "tinyimagenet")] + \
    [("finetune_vit.py", d) for d in ("cifar10", "cifar100", "imagenet-r")] + [("train_det_voc.py", "voc2007")]


def timed_noise():
    """Wrap core's per-sample noise functions so that the seconds spent in them are counted (`seconds[0]`):
    the host-side work that --speed reports as host_share (core.uniforms draws through train_noise, so it is
    counted there). Returns (seconds, undo)."""
    seconds, originals = [0.0], {name: getattr(core, name) for name in ("train_noise", "noise_for")}

    def wrap(fn):
        def timed(*a, **kw):
            start = time.perf_counter()
            out = fn(*a, **kw)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[0] += time.perf_counter() - start
            return out
        return timed
    for name, fn in originals.items():
        setattr(core, name, wrap(fn))
    return seconds, lambda: [setattr(core, name, fn) for name, fn in originals.items()]


def speed_pair(script, dataset, T, bs, extra, device, steps):
    """Training images/s of fm and bp on one setup: a random batch on the device and the script's own
    train_step, gradient clipping and AdamW step (fused on CUDA, as the scripts), 2 warm-up steps each,
    then `steps` timed steps of each, fm and bp alternating so that both see the same machine load;
    img/s from the median step time. host_share: the share of fm's step spent generating per-sample
    noise (core.train_noise / uniforms), the host-side work. params_m: the model's parameters (millions);
    gflop_per_img: one training step's matrix-product and convolution FLOPs per image, counted by
    torch.utils.flop_counter on an untimed step (None with --compile or flow maps), so that a ratio of
    img/s can be read against the ratio of work. Returns {method: row}."""
    module = importlib.import_module(script[:-3])
    runs = {}
    for method in ("fm", "bp"):
        margs, model, x, y = random_setup(
            module, ["--dataset", dataset, "--method", method] + (["--T", str(T)] if T else []) + extra, bs, device)
        if getattr(margs, "channels_last", False):
            model = model.to(memory_format=torch.channels_last)
        if getattr(margs, "compile", False):
            core.compile_model(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        batch = (x, y, torch.arange(bs))
        flops = None
        # the counter's module tracker cannot follow torch.func.jvp (flow maps) or compiled graphs
        if not getattr(margs, "compile", False) and getattr(margs, "objective", "velocity") == "velocity":
            with FlopCounterMode(display=False) as counter:
                module.train_step(model, None, batch, list(range(margs.T)), (0, 0, 0), margs, device)
            model.zero_grad(set_to_none=True)
            flops = counter.get_total_flops()
        info = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "gflop_per_img": None if flops is None else flops / bs / 1e9}
        runs[method] = (margs, model, optimizer, batch, [], [], info)  # step and noise seconds

    def step(method, i):
        margs, model, optimizer, batch, times, noise, _ = runs[method]
        seconds, undo = timed_noise()
        start = time.perf_counter()
        try:
            optimizer.zero_grad(set_to_none=True)
            module.train_step(model, None, batch, list(range(margs.T)), (0, 0, i), margs, device)
            core.clip_and_step(optimizer, model.parameters(), 1.0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            undo()
        if i >= 2:  # after the warm-up steps
            times.append(time.perf_counter() - start)
            noise.append(seconds[0])
    for i in range(2 + steps):
        for method in runs:
            step(method, i)
    rows = {}
    for method, (margs, _, _, _, times, noise, info) in runs.items():
        rows[method] = {"script": script, "setup": dataset, "method": method, "T": margs.T, "batch": bs,
                        "amp": bool(getattr(margs, "amp", False)), "compile": bool(getattr(margs, "compile", False)),
                        "channels_last": bool(getattr(margs, "channels_last", False)), "device": str(device),
                        "img_per_s": bs / statistics.median(times), "host_share": sum(noise) / sum(times), **info}
    return rows


def mode_speed(args, extra, device):
    """analyze.py --speed: training throughput of fm and bp for every paper setup (random data), the fm/bp
    ratio and the host share of the step; a table, speed.json and a bar chart of the ratios."""
    wanted = set(args.speed_setups.split(",")) if args.speed_setups else None
    rows = []
    for script, dataset in SPEED_SETUPS:
        if wanted is not None and f"{script}:{dataset}" not in wanted:
            continue
        big = script in ("finetune_vit.py", "train_det_voc.py")  # ViT-B/16 at 224 px, ResNet-50 at 256 px
        bs = args.speed_bs or (None if device.type == "cuda" else (4 if big else 8))
        if bs is None:
            bs = importlib.import_module(script[:-3]).parse_args(["--dataset", dataset]).bs
        Ts = [int(t) for t in args.speed_T.split(",")] if args.speed_T else [None]
        for T in Ts:
            pair = speed_pair(script, dataset, T, bs, extra, device, args.speed_steps)
            fm, bp = pair["fm"], pair["bp"]
            for row in pair.values():
                row["fm_over_bp"] = fm["img_per_s"] / bp["img_per_s"]
                rows.append(row)
            work = "" if fm["gflop_per_img"] is None else f", FLOP {fm['gflop_per_img'] / bp['gflop_per_img']:.2f}x"
            print(f"speed  {script:17s} {dataset:12s} T={fm['T']:2d} bs={bs:3d}: fm {fm['img_per_s']:8.1f} "
                  f"img/s (host {fm['host_share']:.1%})  bp {bp['img_per_s']:8.1f} img/s  "
                  f"fm/bp {fm['fm_over_bp']:.2f} (params {fm['params_m'] / bp['params_m']:.2f}x{work})", flush=True)
    fig, ax = plt.subplots(figsize=(10, 4))
    fm_rows = [r for r in rows if r["method"] == "fm"]
    ax.bar(range(len(fm_rows)), [r["fm_over_bp"] for r in fm_rows])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(fm_rows)), [f"{r['script'][:-3]}\n{r['setup']} T={r['T']}" for r in fm_rows], rotation=45,
                  ha="right", fontsize=7)
    ax.set_ylabel("fm / bp training images per second")
    ax.set_title(f"Training throughput, {device}, amp={bool(fm_rows and fm_rows[0]['amp'])}")
    return rows, fig


def main(args, extra):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else \
        torch.device(args.device)
    modes = [m for m in ("probe", "inference", "geometry", "refinement", "grad_variance", "curves", "memory", "speed")
             if getattr(args, m)]
    if not modes:
        sys.exit("error: choose at least one mode (--probe, --inference, --geometry, --refinement, --grad-variance, "
                 "--curves, --memory, --speed)")
    if set(modes) - {"memory", "speed"} and not args.ckpt:
        sys.exit("error: every mode but --memory and --speed needs --ckpt")
    if extra and not {"memory", "speed"} & set(modes):
        sys.exit(f"error: unrecognized arguments: {' '.join(extra)}")
    try:
        runs = [Run(path, device) for path in args.ckpt]
    except (core.CheckpointError, core.DataError) as e:
        sys.exit(f"error: {e}")
    outdir = args.outdir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt[0] if args.ckpt else ".")), "analysis")
    os.makedirs(outdir, exist_ok=True)
    results = {}
    for mode in modes:
        try:
            if mode in ("memory", "speed"):
                rows, fig = globals()[f"mode_{mode}"](args, extra, device)
            else:
                rows, fig = globals()[f"mode_{mode}"](runs, args)
        except core.DataError as e:
            sys.exit(f"error: {e}")
        with open(os.path.join(outdir, f"{mode}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        if fig is not None:
            if mode not in ("probe", "inference", "speed"):  # stages, steps, blocks, epochs and T are whole numbers
                for ax in fig.axes:
                    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            fig.tight_layout()
            fig.savefig(os.path.join(outdir, f"{mode}.png"), dpi=120)
            plt.close(fig)
        results[mode] = rows
    print(f"wrote {', '.join(m + '.json' for m in modes)} and plots to {outdir}")
    return results


if __name__ == "__main__":
    parsed, unknown = get_args_parser().parse_known_args()
    main(parsed, unknown)
