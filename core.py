"""Discriminative Flow Matching (DFM): the method, and nothing else.

Jha, Bamniya, Borthakur (2026), "Discriminative Flow Matching via Local Generative Predictors".
Symbols follow the paper (Sections 3 and A):

    z0 ~ N(0, I)                    noise latent, [B, d] (detection: [B, M, d])
    z1                              task target (class embedding W_embed[y], or M query embeddings)
    zt = (1 - t) z0 + t z1          linear (optimal-transport) path, t ~ U[0, 1] per sample   (eq. 3)
    u  = z1 - z0                    target velocity                                            (eq. 4)
    v_k(zt, f(x), t)                flow head k, k = 0..T-1 (the paper counts from 1)          (eq. 8)
    z1_hat = zt + (1 - t) v         the head's estimate of the path's end point                (eq. 15)
    L_k = MSE(v, u) + lambda * CE(W_cls^T z1_hat, y)                                           (eq. 19)

What lives here: the time embedding, the two flow-head types (residual MLP for pooled features,
token head for an unpooled token sequence), the class-target embedding with its collapse guard,
the path and local loss, the memory-lean block-wise backward, single-step / ensemble / Euler (and
Heun, midpoint) inference, and the small utilities every script needs (device, seeding, per-sample
noise, atomic checkpoints, a saved-activation meter). Datasets, backbones, task losses for detection
and the epoch loop live in the scripts.
"""
import json
import math
import os
import random
import signal
import sys
import tempfile
import time

import numpy as np
import timm.models.vision_transformer
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# Utilities shared by every script
# ----------------------------------------------------------------------------------------------
def get_device(name="auto"):
    """'auto' -> CUDA when present, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device, enabled):
    """bf16 autocast on CPU or CUDA (no grad scaler needed for bf16)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def noise_for(indices, shape, seed=0, device="cpu"):
    """z0 for each sample, seeded by the sample's dataset index: evaluation does not depend on the
    batch size or on how the data is sharded. indices: [B] ints; returns [B, *shape]."""
    gen = torch.Generator()
    out = torch.empty((len(indices), *shape))
    for row, idx in enumerate(indices.tolist()):
        gen.manual_seed(seed * 1_000_003 + int(idx))
        out[row] = torch.randn(shape, generator=gen)
    return out.to(device)


def train_noise(indices, key, shape, device="cpu"):
    """Training noise per sample: (z0 [B, *shape] ~ N(0, I), u [B] ~ U[0, 1)), a function of `key`
    (e.g. (seed, epoch, pass, head)) and the sample's dataset index only. A global batch split over
    several processes therefore draws exactly what one process draws for the whole batch."""
    gen = torch.Generator()
    z0, u = torch.empty((len(indices), *shape)), torch.empty(len(indices))
    for row, idx in enumerate(indices.tolist()):
        gen.manual_seed(hash((*key, int(idx))) % (2 ** 63))  # ints and tuples of ints hash deterministically
        z0[row] = torch.randn(shape, generator=gen)
        u[row] = torch.rand((), generator=gen)
    return z0.to(device), u.to(device)


class WithIndex(torch.utils.data.Dataset):
    """Wraps a dataset so items come as (*item, index): per-sample z0 needs the index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


class Seeded(torch.utils.data.Dataset):
    """Draws each item's random augmentation from the torch RNG seeded by (seed, epoch, index), inside
    a forked RNG: augmentation then depends neither on the batch size, the number of processes or
    loader workers, nor on where a run was resumed. `fit` sets `epoch` before every pass."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, int(i))) % (2 ** 63))
            return self.dataset[i]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, not a checkpoint, or from another script/config."""


def save_checkpoint(state, path):
    """Atomic save: write a temp file in the same folder, fsync, then os.replace. A crash at any
    moment leaves either the old or the new checkpoint, never a partial one."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True: tensors, numbers, strings and containers only. Anything
    else (a pickled object, a truncated or foreign file) raises CheckpointError with one line."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a loadable checkpoint ({first[:160]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return state


def truncate_log(path, epochs):
    """On resume: keep the JSON-lines log's first `epochs` epoch records (a run killed between its
    log line and its checkpoint would otherwise log that epoch twice)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) <= epochs]
    with open(path, "w") as f:
        f.writelines(lines)


def load_for_resume(path, script, args, arch):
    """The checkpoint at `path`, checked to come from `script` with the same values of the
    architecture flags `arch` as the dict `args`; CheckpointError with one line otherwise."""
    state = load_checkpoint(path)
    if state.get("script") != script:
        raise CheckpointError(f"{path} was written by {state.get('script')}, not {script}")
    diff = [k for k in arch if state.get("args", {}).get(k) != args.get(k)]
    if diff:
        raise CheckpointError(f"{path} was trained with different {', '.join(diff)}")
    return state


def start_or_resume(out, script, args, arch, resume, model, optimizer, scheduler, ema=None):
    """Begin a run at `out`, or with resume=True restore model, optimiser, scheduler, EMA and RNG
    states from it (checked with load_for_resume) and cut its JSON-lines log back to the
    checkpoint's epoch. Refuses to start over an existing checkpoint. Returns (first epoch to run,
    the position inside it when the checkpoint was saved mid-epoch by a preempted run, else None);
    CheckpointError with one line on any problem. Only the main process touches the log."""
    log_path = os.path.splitext(out)[0] + ".jsonl"
    if not resume:
        if os.path.exists(out):
            raise CheckpointError(f"{out} exists; pass --resume to continue it or choose another --out")
        if is_main():
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            open(log_path, "w").close()
        return 0, None
    state = load_for_resume(out, script, args, arch)
    partial = state.get("partial")
    if partial and partial["world"] != world_size():
        raise CheckpointError(f"{out} was saved mid-epoch by {partial['world']} process(es); resume it with as many")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
    if is_main():
        truncate_log(log_path, state["epoch"] + 1)
    return state["epoch"] + 1, partial


def rng_state():
    """All RNG states, in types that torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                        has_gauss, gauss], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SavedActivationMeter:
    """Peak bytes of tensors saved for backward, counted once per storage, parameters excluded.

    Inside `with meter:` every tensor autograd saves is wrapped; a storage counts while at least one
    saved reference to it is alive (the graph that holds it has not been freed). This measures the
    paper's 'activation memory' on CPU, where there is no allocator peak to read.
    """

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.live = {}  # storage ptr -> [refcount, bytes]
        self.current = 0
        self.peak = 0
        self._hooks = None

    def _pack(self, tensor):
        meter = self

        class Saved:
            __slots__ = ("tensor", "key", "__weakref__")

            def __init__(self, t):
                self.tensor = t
                self.key = t.untyped_storage().data_ptr()
                if self.key in meter.exclude or t.device.type == "meta":
                    self.key = None
                    return
                entry = meter.live.setdefault(self.key, [0, t.untyped_storage().nbytes()])
                if entry[0] == 0:
                    meter.current += entry[1]
                    meter.peak = max(meter.peak, meter.current)
                entry[0] += 1

            def __del__(self):
                if self.key is None:
                    return
                entry = meter.live[self.key]
                entry[0] -= 1
                if entry[0] == 0:
                    meter.current -= entry[1]
                    del meter.live[self.key]

        return Saved(tensor)

    @staticmethod
    def _unpack(saved):
        return saved.tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def measure_step_memory(step_fn, model, device):
    """Peak training-step memory: CUDA allocator peak on GPU, saved-activation bytes on CPU.

    step_fn(model) runs one forward + backward. It runs on a deep copy of `model` with the RNG
    forked, so the measurement changes neither the weights, the BN statistics nor the random stream
    (a resumed run stays bit-identical)."""
    import copy
    model = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _measure(lambda: step_fn(model), model, device)


def _measure(step_fn, model, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    with SavedActivationMeter(exclude=list(model.parameters())) as meter:
        step_fn()
    return int(meter.peak)


# ----------------------------------------------------------------------------------------------
# Time embedding and flow heads
# ----------------------------------------------------------------------------------------------
class TimeEmbedding(nn.Module):
    """e_t = MLP(sinusoid(t)) in R^d (eq. 6). t: [B] in [0, 1] -> [B, d]."""

    def __init__(self, dim, freq_dim=128, max_period=10_000.0):
        super().__init__()
        half = freq_dim // 2
        # scaled so t in [0, 1] covers the same frequency range as diffusion step indices in [0, 1000)
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half) * 1000.0,
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        angles = t.float()[:, None] * self.freqs[None]  # [B, freq_dim/2]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.mlp[0].weight.dtype))


class ResidualMLP(nn.Module):
    """in_dim -> hidden, `blocks` pre-LN residual blocks (LN, Linear, GELU, Dropout, Linear), LN -> out_dim.
    The paper's 'deep residual MLP (hidden 1024, LayerNorm, Dropout)' of D.2. blocks = 0 is D.2's
    'lighter, single-hidden-layer MLP (with Dropout)': Linear, GELU, Dropout, Linear."""

    def __init__(self, in_dim, hidden, out_dim, blocks=2, dropout=0.1):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(hidden, hidden))
            for _ in range(blocks))
        self.out = (nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, out_dim)) if blocks else
                    nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class MLPFlowHead(nn.Module):
    """v_k for pooled features (eqs. 7-8): h = concat(f(x), z_t + e_t), v = ResidualMLP(h).

    Each head owns its time embedding, so head k's parameters are touched by head k's loss only.
    feat: [B, F], z: [B, d], t: [B] -> [B, d].
    """

    def __init__(self, feat_dim, dim, hidden=1024, blocks=2, dropout=0.1):
        super().__init__()
        self.time = TimeEmbedding(dim)
        self.mlp = ResidualMLP(feat_dim + dim, hidden, dim, blocks, dropout)

    def forward(self, z, feat, t):
        return self.mlp(torch.cat([feat, z + self.time(t)], dim=-1))


class TokenFlowHead(nn.Module):
    """v_k for an unpooled token sequence: the latent z_t + e_t, projected to the token width, is
    prepended as a query token and one timm transformer block runs over [query; tokens]; the query's
    output is projected back to R^d. One head is exactly one encoder layer of the width of the
    backbone, which is what the bp baseline stacks T times (same capacity).
    tokens: [B, N, D], z: [B, d], t: [B] -> [B, d].
    """

    def __init__(self, token_dim, dim, heads, mlp_ratio=4.0, dropout=0.0):
        super().__init__()
        self.time = TimeEmbedding(dim)
        self.inp = nn.Linear(dim, token_dim)
        self.block = timm.models.vision_transformer.Block(token_dim, heads, mlp_ratio, qkv_bias=True,
                                                          proj_drop=dropout)
        self.out = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, dim))

    def forward(self, z, tokens, t):
        query = self.inp(z + self.time(t))[:, None]  # [B, 1, D]
        return self.out(self.block(torch.cat([query, tokens], dim=1))[:, 0])


class ClassEmbedding(nn.Module):
    """Learnable class targets z1 = W_embed[y] with a collapse guard.

    Why a guard: the flow loss alone has a trivial minimum. If every class embedding moves to one
    common point c, then zt = (1 - t) z0 + t c and the target velocity c - z0 = (c - zt) / (1 - t) is
    a function of zt and t alone: a head can drive the flow MSE to zero without looking at the image.
    Gradient descent on the MSE with respect to W_embed moves there (early on v ~ 0 and the gradient
    pulls every row towards the mean of z0, i.e. towards 0).

    The guard (guard=True, the default) has two parts:
      1. rows are used through a fixed-radius projection, z1 = radius * W[y] / ||W[y]||, so the
         targets can neither shrink to a point nor grow without bound (radius = sqrt(d), the typical
         norm of z0, so source and target have the same scale);
      2. the flow MSE sees z1 through a stop-gradient (`flow_matching_loss(..., detach_target=True)`,
         which FlowClassifier passes when the guard is on); the embedding is shaped by the anchor
         cross-entropy only, whose gradient pushes class targets apart.
    guard=False gives the plain learnable table the paper describes; `test_core.py` shows it
    collapsing under the flow loss and the guarded one keeping its classes apart.
    """

    def __init__(self, num_classes, dim, guard=True):
        super().__init__()
        self.guard = guard
        self.radius = math.sqrt(dim)
        self.weight = nn.Parameter(torch.randn(num_classes, dim))

    def table(self):
        """[C, d] all class targets."""
        if self.guard:
            return self.radius * F.normalize(self.weight, dim=-1)
        return self.weight

    def forward(self, y):
        return self.table()[y]


# ----------------------------------------------------------------------------------------------
# Path, time sampling and local loss
# ----------------------------------------------------------------------------------------------
def sample_t(n, head, T, time_split, device, dist="uniform", u=None):
    """t per sample: 'uniform' U[0, 1] (the paper); 'early' u^2 (density 1 / (2 sqrt t): more training
    where z_t says little about z1 and the head must read the image); 'zero' t = 0 always (each head
    learns the one-step map z0 -> z1 used by single-step and ensemble inference). With time_split,
    head k draws from [k/T, (k+1)/T), the interval it owns in multi-step inference (eq. 24).
    u: the U[0, 1) draws to use ([n], e.g. from `train_noise`); fresh ones when None. Returns [n]."""
    u = torch.rand(n, device=device) if u is None else u
    u = {"uniform": u, "early": u * u, "zero": torch.zeros_like(u)}[dist]
    if not time_split:
        return u
    return (head + u) / T


def path(z0, z1, t, sigma_min=0.0):
    """Lipman et al. OT path with sigma_min (sigma_min = 0 is the paper's eq. 3-4).
    z0, z1: [B, ...]; t: [B]. Returns zt and the target velocity u, same shape as z0."""
    t = t.view(-1, *([1] * (z0.dim() - 1)))
    zt = (1 - (1 - sigma_min) * t) * z0 + t * z1
    return zt, z1 - (1 - sigma_min) * z0


def endpoint(zt, v, t):
    """z1_hat = zt + (1 - t) v (eq. 15): one Euler step to t = 1 from wherever the latent is."""
    return zt + (1 - t.view(-1, *([1] * (zt.dim() - 1)))) * v


def flow_matching_loss(head, feat, z1, head_index, T, time_split=False, sigma_min=0.0,
                       reduction="mean", detach_target=False, z0=None, t=None, t_dist="uniform", weight=None):
    """The flow part of head k's local loss.

    head(zt, feat, t) -> v. z1: [B, ...] targets. Returns (mse, z1_hat).
    mse: squared error between v and u. reduction 'mean' averages over every element (the 'Mean
    Squared Error' of A.1.1, on the scale of the CE term); 'sum' sums over latent dimensions and
    averages over the batch (the ||.||^2 of Algorithm 1, d times larger).
    detach_target: the head's input zt and the regression target u see z1 through a stop-gradient,
    so the flow loss cannot move the targets (the collapse guard, see ClassEmbedding); z1_hat still
    carries the gradient d z1_hat / d z1 = t, so the anchor (task) loss does move them.
    weight: optional per-sample factor [B] on the squared error (a function of t, say).
    """
    z1_flow = z1.detach() if detach_target else z1
    z0 = torch.randn_like(z1) if z0 is None else z0
    t = sample_t(z1.shape[0], head_index, T, time_split, z1.device, t_dist) if t is None else t
    zt, u = path(z0, z1_flow, t, sigma_min)
    v = head(zt, feat, t)
    err = (v - u).to(torch.promote_types(v.dtype, torch.float32)) ** 2  # fp32 at least, also under bf16
    if weight is not None:
        err = err * weight.view(-1, *([1] * (err.dim() - 1)))
    mse = err.mean() if reduction == "mean" else err.flatten(1).sum(1).mean()
    z1_hat = endpoint(zt, v, t)
    if detach_target:  # same value; routes the anchor gradient into z1 through zt's t * z1 term
        z1_hat = z1_hat + t.view(-1, *([1] * (z1.dim() - 1))) * (z1 - z1_flow)
    return mse, z1_hat


class FlowClassifier(nn.Module):
    """Backbone + T flow heads + class targets + W_cls + detached linear probe (classification).

    backbone(x) returns a list of feature tensors (one per stage; pooled [B, F_s] or tokens
    [B, N, D]). head_stage[k] says which of them head k reads: all heads read the last one in the
    'parallel' topology; the CNN's 'sequential' topology attaches head k to stage k.
    """

    def __init__(self, backbone, heads, num_classes, dim, head_stage=None, probe_dim=None, guard=True):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.head_stage = list(head_stage) if head_stage is not None else [-1] * len(heads)
        self.embed = ClassEmbedding(num_classes, dim, guard)
        self.cls = nn.Linear(dim, num_classes, bias=False)  # W_cls (eqs. 16, 29)
        self.probe = nn.Linear(probe_dim, num_classes)  # A.3.5, trained on detached features
        self.dim = dim

    @property
    def T(self):
        return len(self.heads)

    def head_loss(self, k, feats, y, lam=1.0, time_split=False, sigma_min=0.0, reduction="mean", t_dist="uniform",
                  noise=None):
        """L_k = MSE + lam * CE(W_cls^T z1_hat, y) (eq. 19) for head k on backbone features `feats`.
        noise: (z0 [B, d], u [B]) from `train_noise`, or None for fresh draws."""
        z0, u = noise if noise is not None else (None, None)
        t = sample_t(len(y), k, self.T, time_split, y.device, t_dist, u)
        mse, z1_hat = flow_matching_loss(self.heads[k], feats[self.head_stage[k]], self.embed(y), k, self.T,
                                         time_split, sigma_min, reduction, detach_target=self.embed.guard,
                                         z0=z0, t=t)
        ce = F.cross_entropy(self.logits(z1_hat), y)
        return mse + lam * ce

    def probe_loss(self, feats, y):
        """Cross-entropy of the linear probe on detached, pooled last-stage features (eq. 32)."""
        return F.cross_entropy(self.probe(pool(feats[-1]).detach()).float(), y)

    def velocity(self, k, z, feats, t):
        return self.heads[k](z, feats[self.head_stage[k]], t)

    def logits(self, z):
        """W_cls^T z (eqs. 16, 29), in fp32 at least."""
        out = self.cls(z.to(self.cls.weight.dtype))
        return out.to(torch.promote_types(out.dtype, torch.float32))


def pool(feat):
    """Pooled features for probes and geometry: tokens [B, N, D] -> mean over N; [B, F] unchanged."""
    return feat.mean(1) if feat.dim() == 3 else feat


# ----------------------------------------------------------------------------------------------
# Block-wise training step (the memory property)
# ----------------------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
    """Raised when a head's loss is NaN or inf; names the head."""

    def __init__(self, head, value):
        super().__init__(f"non-finite loss {value} in head {head}")
        self.head = head


def blockwise_backward(features, head_ids, head_loss, all_features=False):
    """Accumulate the gradients of sum_k head_loss(k) holding at most one head's graph at a time.

    features: list of backbone outputs, still attached to the backbone's graph.
    head_ids: heads to train on this batch (all of them in the parallel schedule, [k] in the
      sequential one).
    head_loss(k, leaves) -> scalar loss of head k, computed from `leaves`, detached copies of
      `features` that collect d loss / d features.

    For each head: forward, backward (head parameters and shared targets get their gradients, the
    head's graph is freed), the feature gradient accumulates in the leaves. Then one backward runs
    through the backbone with the accumulated feature gradient. Peak saved activations = backbone +
    one head, whatever T is, and the backbone gradient equals that of the summed losses (chain rule:
    d sum_k L_k / d phi = (sum_k d L_k / d f) d f / d phi). Returns {k: loss value}.
    all_features: the final backward also runs from features no head read (zero gradient), so every
    backbone parameter gets a gradient; DDP needs that to reduce once and never wait on a missing one.
    """
    leaves = [f.detach().requires_grad_(f.requires_grad) for f in features]
    losses = {}
    for k in head_ids:
        loss = head_loss(k, leaves)
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(k, value)
        loss.backward()
        losses[k] = value
    pairs = [(f, leaf.grad if leaf.grad is not None else torch.zeros_like(f))
             for f, leaf in zip(features, leaves) if f.requires_grad and (leaf.grad is not None or all_features)]
    if pairs:
        torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
    return losses


def classifier_step(model, x, y, heads, device, opts, forward=None, index=None, noise_key=None):
    """One training step without the optimiser, for classification.

    FlowClassifier: backbone forward once, then `blockwise_backward` over `heads` (all T in the
    parallel schedule, [k] in the sequential one) with each head's local loss, then the detached
    probe. Any other model (the bp baselines): cross-entropy of model(x), one joint backward.
    opts: the script's flags (amp, lam, time_split, sigma_min, mse, t_dist).
    forward: what runs the backbone (fm) or the whole model (bp); the DDP wrapper under torchrun.
    index, noise_key: per-sample training noise (`train_noise`) when given, fresh draws otherwise.
    Returns {'loss': mean head loss, 'probe', 'loss_h{k}'} or {'loss'}; NonFiniteLoss on NaN/inf.
    """
    with autocast(device, opts.amp):
        if not isinstance(model, FlowClassifier):
            loss = F.cross_entropy((forward or model)(x).float(), y)
            if not math.isfinite(loss.item()):
                raise NonFiniteLoss("bp", loss.item())
            loss.backward()
            return {"loss": loss.item()}
        feats = (forward or model.backbone)(x)

        def head_loss(k, f):
            noise = None if index is None else train_noise(index, (*noise_key, k), (model.dim,), device)
            return model.head_loss(k, f, y, opts.lam, opts.time_split, opts.sigma_min, opts.mse,
                                   getattr(opts, "t_dist", "uniform"), noise)
        losses = blockwise_backward(feats, heads, head_loss, all_features=forward is not None)
        probe = model.probe_loss(feats, y)
    probe.backward()
    return {"loss": sum(losses.values()) / len(losses), "probe": probe.item(),
            **{f"loss_h{k}": v for k, v in losses.items()}}


def clip_and_step(optimizer, params, clip=1.0):
    """Gradient clipping at `clip` (paper D: 1.0), then the optimiser step. Returns the grad norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else torch.tensor(0.0)
    optimizer.step()
    return float(norm)


def make_ema(model, decay, buffers="avg"):
    """Weight EMA (paper: CNN 0.995) with torch's AveragedModel and the usual warm-up of its decay:
    update n uses min(decay, (1 + n) / (10 + n)), so a short run is not evaluated on weights that
    still remember the random init (at 0.995 from the first step, 8 epochs of 62 steps leave
    0.995^496 = 8% of the init in the average).
    buffers: 'avg' averages the BatchNorm statistics like the weights; 'raw' keeps the trained
    model's own statistics (AveragedModel's use_buffers=False copies them at every update)."""
    @torch.no_grad()
    def ema_warmup(averaged, current, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1.0 - d)
        else:  # integer buffers (BatchNorm's num_batches_tracked) come in their own group
            for a, c in zip(averaged, current):
                a.copy_(c)
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=ema_warmup, use_buffers=buffers == "avg")


def warmup_cosine(optimizer, warmup_steps, total_steps):
    """Linear warmup to the base lr, then cosine to 0 (paper D.2 from-scratch schedule)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------------------------
# The training loop of every script: one device or torchrun/DDP, preemption, resume
# ----------------------------------------------------------------------------------------------
def init_distributed(device_name="auto"):
    """This process's device. Under torchrun (WORLD_SIZE > 1) it also joins the process group: NCCL
    on CUDA with one GPU per process (cuda:LOCAL_RANK), gloo on CPU."""
    device = get_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    return rank() == 0


def main_first(fn):
    """fn() on rank 0 first, then on the other processes: what downloads or writes files (datasets)
    does it once. If rank 0 fails, the others still get past the barrier and meet the error themselves."""
    if world_size() == 1:
        return fn()
    if is_main():
        try:
            return fn()
        finally:
            dist.barrier()
    dist.barrier()
    return fn()


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values):
    """Element-wise sum over processes of a list of numbers (the list itself with one process)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_gather(items):
    """The concatenation over processes (in rank order) of each process's list of picklable items."""
    if world_size() == 1:
        return list(items)
    out = [None] * world_size()
    dist.all_gather_object(out, list(items))
    return [item for part in out for item in part]


def shard(dataset):
    """This process's share of an evaluation set: every world-th sample from its rank on, without the
    padding DistributedSampler adds, so counts summed over processes equal one process's."""
    return dataset if world_size() == 1 else Subset(dataset, range(rank(), len(dataset), world_size()))


def epoch_batches(dataset, bs, epoch, seed, drop_last):
    """This process's batches (lists of indices) for one pass over `dataset`. The order is a
    permutation fixed by (seed, epoch), dealt round-robin to the processes (DistributedSampler, used
    with one process too), so N processes at batch bs see the batches one process sees at N * bs."""
    sampler = DistributedSampler(dataset, world_size(), rank(), shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, bs, drop_last))


def passes_per_epoch(args):
    """T in the sequential schedule (Algorithm 1: a full pass per flow head), else 1."""
    return args.T if args.method == "fm" and args.mode == "sequential" else 1


def steps_per_pass(dataset, args):
    """Optimiser steps in one pass over this process's share of `dataset` (capped by --max-steps)."""
    steps = len(epoch_batches(dataset, args.bs, 0, args.seed, len(dataset) > args.bs * world_size()))
    return min(steps, args.max_steps) if args.max_steps else steps


def steps_per_epoch(dataset, args):
    """Optimiser steps per epoch, for building schedulers."""
    return steps_per_pass(dataset, args) * passes_per_epoch(args)


def sync_gradients(params):
    """Average the gradients of `params` over processes in one all-reduce: the flow heads and targets,
    which sit outside DDP so that the block-wise step reduces once per optimiser step, not once per
    head backward. A parameter no process touched keeps grad None (AdamW skips it, as with one
    process); one that some process touched gets the average, zeros standing in for the others, so
    a head that skipped a step cannot hang the rest."""
    params = list(params)
    if world_size() == 1 or not params:
        return
    flags = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [flags])
    dist.all_reduce(flat)
    offset = 0
    for p, touched in zip(params, flat[-len(params):].tolist()):
        n = p.numel()
        p.grad = (flat[offset:offset + n] / world_size()).view_as(p).to(p.dtype) if touched else None
        offset += n


def replica_difference(model):
    """Largest |parameter - rank 0's| over all parameters and processes; 0 when replicas agree."""
    if world_size() == 1:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()]).to(_comm_device())
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


class Preemption:
    """SIGTERM, the way schedulers preempt jobs, only sets a flag (`with Preemption() as p:`); the
    loop asks p.requested() after each step, which agrees across processes, then saves and exits."""

    EXIT_CODE = 128 + signal.SIGTERM  # 143: a job chain does not mistake a preempted run for a finished one

    def __init__(self):
        self.flag, self._old = False, None

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._set)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)

    def _set(self, signum, frame):
        self.flag = True

    def requested(self):
        if world_size() == 1:
            return self.flag
        return all_sum([float(self.flag)])[0] > 0


def _one_line(e):
    """The message of an exception raised in a DataLoader worker (which wraps it in a traceback)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if lines and "Traceback" in str(e) else (lines[0] if lines else repr(e))


def check_flags(args):
    """One-line exit for flag values and combinations that cannot run (before anything is written)."""
    for name in ("epochs", "bs", "T"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} must be at least 1, got {getattr(args, name)}")
    if args.method == "bp" and args.mode == "sequential":
        sys.exit("error: --mode sequential trains flow heads one at a time; it does not apply to --method bp")
    if args.method == "bp" and getattr(args, "time_split", False):
        sys.exit("error: --time-split assigns time intervals to flow heads; it does not apply to --method bp")


def fit(args, script, arch, model, optimizer, scheduler, train_set, step, evaluate, summary, ema=None,
        schedule_per_step=True, collate_fn=None, extra_state=None, test=None):
    """The training loop of the four scripts, on one device or under torchrun.

    args: the script's flags; read here: epochs, bs (per process), seed, out, resume, max_steps,
      clip, method, mode, T, workers.
    step(model, forward, batch, heads, noise_key) -> {'loss', ...}: forward and backward of one batch
      (x, target, index), no optimiser step. `forward` runs the backbone (fm) or the whole model (bp):
      the DDP wrapper under torchrun, None otherwise (and when memory is measured on a copy).
      noise_key = (seed, epoch, pass): key of the per-sample training noise (`train_noise`).
    evaluate(model) -> validation metrics, logged every epoch with the prefix val_ (None: no validation
      split, a --final run); test(model) -> test metrics, logged unprefixed after the last epoch only
      (every epoch with args.test_every_epoch, for curves). Every process calls both and they reduce
      over processes (`all_sum`). With an EMA, the raw weights are evaluated too (prefix raw_ after
      the split's: val_raw_acc, raw_acc).
    summary(record) -> the text after 'epoch e/E' in the per-epoch line.

    Under torchrun the backbone (fm) or the model (bp) is DDP-wrapped and reduced in its single
    backward; the heads' gradients are reduced once per step by `sync_gradients`. Only rank 0 prints,
    logs and saves. Per epoch: one JSON line (written before the checkpoint) and an atomic checkpoint
    of everything needed to resume. SIGTERM: finish the step, save the position inside the epoch,
    exit with status 143; --resume continues from that step. A non-finite loss stops the run naming
    the head and step, without writing a checkpoint. Returns the last epoch's record.
    """
    device = next(model.parameters()).device
    world, blockwise = world_size(), args.method == "fm"
    passes, per_pass = passes_per_epoch(args), steps_per_pass(train_set, args)
    drop_last = len(train_set) > args.bs * world
    log_path = os.path.splitext(args.out)[0] + ".jsonl"
    try:
        start_epoch, position = start_or_resume(args.out, script, vars(args), arch, args.resume, model, optimizer,
                                                scheduler, ema)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    forward, local = None, []
    if world > 1:
        wrapped = model.backbone if blockwise else model
        forward = DistributedDataParallel(wrapped, device_ids=[device] if device.type == "cuda" else None)
        inside = {id(p) for p in wrapped.parameters()}
        local = [p for p in model.parameters() if id(p) not in inside]
    if is_main():
        print(f"batch {args.bs} per process x {world} process(es) = {args.bs * world} global; "
              f"{passes * per_pass} steps per epoch")

    def save(epoch_done, position):
        if is_main():
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
                             "rng": rng_state(), "epoch": epoch_done, "partial": position, "script": script,
                             "args": vars(args), **(extra_state or {})}, args.out)
        if world > 1:
            dist.barrier()  # nobody exits while rank 0 is still writing

    peak, record = None, None
    loader_kw = dict(num_workers=args.workers, collate_fn=collate_fn, pin_memory=device.type == "cuda")
    epoch, count = start_epoch, 0
    try:
        with Preemption() as preempt:
            for epoch in range(start_epoch, args.epochs):
                resumed = position if position and position["epoch"] == epoch else None
                model.train()
                t0 = time.time() - (resumed["elapsed"] if resumed else 0.0)
                sums, count = (dict(resumed["sums"]), resumed["count"]) if resumed else ({}, 0)
                bar = tqdm(total=passes * per_pass, initial=count, desc=f"epoch {epoch + 1}/{args.epochs}",
                           leave=False, disable=None if is_main() else True)
                for p in range(resumed["pass"] if resumed else 0, passes):
                    heads = [p] if passes > 1 else list(range(args.T))
                    skip = resumed["step"] if resumed and p == resumed["pass"] else 0
                    order = epoch_batches(train_set, args.bs, epoch * passes + p, args.seed, drop_last)
                    batches = order[skip:per_pass]
                    key = (args.seed, epoch, p)
                    if isinstance(train_set, Seeded):
                        train_set.epoch = epoch * passes + p
                    # own generator: creating the iterator must not draw from the global RNG (resume)
                    loader = DataLoader(train_set, batch_sampler=batches, **loader_kw,
                                        generator=torch.Generator().manual_seed(hash(key) % (2 ** 63)))
                    for i, batch in enumerate(loader, start=skip):
                        optimizer.zero_grad(set_to_none=True)
                        if peak is None:  # memory of one training step, measured once on a copy of the model
                            peak = measure_step_memory(lambda m: step(m, None, batch, heads, key), model, device)
                        losses = step(model, forward, batch, heads, key)
                        sync_gradients(local)
                        clip_and_step(optimizer, model.parameters(), args.clip)
                        if schedule_per_step:
                            scheduler.step()
                        if ema is not None:
                            ema.update_parameters(model)
                        for name, value in losses.items():
                            sums[name] = sums.get(name, 0.0) + value
                        count += 1
                        bar.update()
                        bar.set_postfix(loss=f"{losses['loss']:.3f}")
                        if preempt.requested():  # finish the step, save the position in the epoch, exit
                            save(epoch - 1, {"epoch": epoch, "pass": p, "step": i + 1, "sums": sums,
                                             "count": count, "elapsed": time.time() - t0, "world": world})
                            if is_main():
                                print(f"SIGTERM: saved epoch {epoch + 1} at step {count} to {args.out}; "
                                      f"continue with --resume", flush=True)
                            sys.exit(Preemption.EXIT_CODE)
                bar.close()
                if not schedule_per_step:
                    scheduler.step()
                names = sorted(sums)
                totals = all_sum([sums[n] for n in names] + [count])
                # the EMA's weights, and the raw ones too, so a user sees when the average lags behind
                weights = [("", ema.module)] + [("raw_", model)] if ema is not None else [("", model)]
                test_now = epoch + 1 == args.epochs or getattr(args, "test_every_epoch", False)
                metrics = {}
                for split, run in (("val_", evaluate), ("", test if test_now else None)):
                    for prefix, evaluated in weights if run is not None else []:
                        metrics.update({f"{split}{prefix}{k}": v for k, v in run(evaluated).items()})
                record = {"epoch": epoch + 1, **{n: v / totals[-1] for n, v in zip(names, totals)}, **metrics,
                          "lr": scheduler.get_last_lr()[0], "time": time.time() - t0, "peak_step_bytes": peak,
                          "global_batch": args.bs * world}
                if world > 1:
                    record["replica_max_diff"] = replica_difference(model)
                if is_main():
                    print(f"epoch {epoch + 1}/{args.epochs} {summary(record)} ({record['time']:.1f}s)", flush=True)
                    with open(log_path, "a") as f:  # log first: a kill before the checkpoint repeats this epoch
                        f.write(json.dumps(record) + "\n")
                save(epoch, None)
                if preempt.requested():
                    if is_main():
                        print(f"SIGTERM: saved epoch {epoch + 1} to {args.out}; continue with --resume", flush=True)
                    sys.exit(Preemption.EXIT_CODE)
    except NonFiniteLoss as e:
        sys.exit(f"error: {e} at epoch {epoch + 1} step {count + 1}; the last good checkpoint {args.out} is untouched")
    except DataError as e:  # raised in a loader worker, it comes back with the worker's traceback
        sys.exit(f"error: {_one_line(e)}")
    return record


# ----------------------------------------------------------------------------------------------
# Inference (A.3): single-step, ensemble, multi-step Euler / Heun / midpoint
# ----------------------------------------------------------------------------------------------
def head_for_time(t, T):
    """Head that owns time t in the piecewise field (eq. 24, counted from 0): floor(T t), clamped."""
    return min(int(math.floor(T * t + 1e-9)), T - 1)


@torch.no_grad()
def single_step(velocity, z0, k):
    """z1_hat = z0 + v_k(z0, 0) (eq. 26). velocity(k, z, t[B]) -> v."""
    t = torch.zeros(z0.shape[0], device=z0.device)
    return z0 + velocity(k, z0, t)


@torch.no_grad()
def ensemble(velocity, z0, T):
    """Mean of the T single-step estimates (eqs. 27-28)."""
    return torch.stack([single_step(velocity, z0, k) for k in range(T)]).mean(0)


@torch.no_grad()
def integrate(velocity, z0, T, steps=None, method="euler", return_path=False, stop=None):
    """Solve dz/dt = v(z, t) from t = 0 to 1 with the piecewise field of eq. 24.

    steps = T (default) with Euler is eq. 25: head k on step k. Each step uses one head for all its
    stages: the head owning the step's midpoint, head_for_time(t_i + dt / 2). With steps a multiple
    of T that is the head whose interval contains the whole step; otherwise a step that straddles two
    intervals goes to the head owning most of it (steps = 5, T = 3: heads 0, 0, 1, 2, 2).
    method: 'euler', 'heun' (2nd order, trapezoidal corrector) or 'midpoint'; Heun's corrector at the
    end of the step uses the predictor's head, so each step stays within one head.
    return_path: also the latent after each step.
    stop: take only the first `stop` steps and return the state there (t = stop / steps), e.g. where
    inference hands the latent to head k (stop = k with steps = T).
    """
    steps = steps or T
    dt = 1.0 / steps
    z = z0
    trajectory = []
    ones = torch.ones(z0.shape[0], device=z0.device)
    for i in range(steps if stop is None else stop):
        t = i * dt
        k = head_for_time(t + 0.5 * dt, T)  # the head owning this step's interval
        v = velocity(k, z, ones * t)
        if method == "euler":
            z = z + dt * v
        elif method == "heun":
            v_end = velocity(k, z + dt * v, ones * (t + dt))
            z = z + 0.5 * dt * (v + v_end)
        elif method == "midpoint":
            z = z + dt * velocity(k, z + 0.5 * dt * v, ones * (t + 0.5 * dt))
        else:
            raise ValueError(f"unknown ODE method {method!r}")
        trajectory.append(z)
    return (z, trajectory) if return_path else z


def topk_correct(logits, y, ks=(1, 5)):
    """Number of samples whose label is in the top-k logits, for each k (k capped at #classes)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == y[:, None]
    return [int(hit[:, :min(k, logits.shape[-1])].any(-1).sum()) for k in ks]


@torch.no_grad()
def evaluate_flow(model, loader, device, seed=0, amp=False, ks=(1, 5)):
    """Top-k accuracy of every inference mode of a FlowClassifier on a loader of (x, y, index).

    z0 comes from `noise_for(index, seed)`, so results do not depend on batch size or sharding; under
    torchrun each process evaluates its `shard` and the counts are summed.
    Returns acc_single (mean over heads of single-step accuracy; per head in acc_single_heads),
    acc_ensemble, acc_multistep (Euler, T steps, head k on step k) and acc_probe, top-1 in [0, 1];
    the top-k for k > 1 as the same name with the suffix _top{k}.
    """
    model.eval()
    T, n = model.T, 0
    hits = {name: [0] * len(ks) for name in ["ensemble", "multistep", "probe"] + [f"h{k}" for k in range(T)]}
    for x, y, idx in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            feats = model.backbone(x)
            z0 = noise_for(idx, (model.dim,), seed, device)
            velocity = lambda k, z, t: model.velocity(k, z, feats, t).float()  # noqa: E731
            singles = [single_step(velocity, z0, k) for k in range(T)]
            outputs = {f"h{k}": model.logits(z) for k, z in enumerate(singles)}
            outputs["ensemble"] = model.logits(torch.stack(singles).mean(0))
            outputs["multistep"] = model.logits(integrate(velocity, z0, T))
            outputs["probe"] = model.probe(pool(feats[-1]))
        for name, logits in outputs.items():
            hits[name] = [a + b for a, b in zip(hits[name], topk_correct(logits.float(), y, ks))]
        n += len(y)
    hits, n = _sum_hits(hits, n)
    return flow_metrics(hits, n, T, ks)


def _sum_hits(hits, n):
    """Hit counts {name: [per k]} and sample count summed over processes (evaluation is sharded)."""
    names = sorted(hits)
    flat = all_sum([h for name in names for h in hits[name]] + [n])
    width = len(hits[names[0]])
    return {name: [int(v) for v in flat[i * width:(i + 1) * width]] for i, name in enumerate(names)}, int(flat[-1])


def flow_metrics(hits, n, T, ks):
    """Turns summed top-k hit counts into the log's accuracy names (see evaluate_flow)."""
    out = {}
    for i, k in enumerate(ks):
        suffix = "" if k == 1 else f"_top{k}"
        heads = [hits[f"h{h}"][i] / n for h in range(T)]
        out[f"acc_single{suffix}"] = sum(heads) / T
        out[f"acc_single_heads{suffix}"] = heads
        for name in ("ensemble", "multistep", "probe"):
            out[f"acc_{name}{suffix}"] = hits[name][i] / n
    return out


@torch.no_grad()
def evaluate_logits(model, loader, device, amp=False, ks=(1, 5)):
    """Top-k accuracy of a plain classifier (the bp baseline): {'acc': top-1, 'acc_top5': ...}."""
    model.eval()
    hits, n = [0] * len(ks), 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        hits = [a + b for a, b in zip(hits, topk_correct(logits.float(), y, ks))]
        n += len(y)
    summed, n = _sum_hits({"acc": hits}, n)
    hits = summed["acc"]
    return {("acc" if k == 1 else f"acc_top{k}"): h / n for k, h in zip(ks, hits)}


def evaluate_classifier(model, loader, device, seed=0, amp=False, ks=(1, 5)):
    """evaluate_flow for a FlowClassifier, evaluate_logits for a bp baseline."""
    if isinstance(model, FlowClassifier):
        return evaluate_flow(model, loader, device, seed, amp, ks)
    return evaluate_logits(model, loader, device, amp, ks)


def topk_for(num_classes):
    """The top-k accuracies to log: top-1 and top-5, and top-10 from 100 classes on (Table 4 reports
    TinyImageNet's top-5 and top-10, Tables 4-5 CIFAR-100's top-5)."""
    return (1, 5, 10) if num_classes >= 100 else (1, 5)


def classification_summary(record):
    """The per-epoch line of the classification scripts: validation top-1 (ensemble, single-step,
    multi-step and probe for fm; acc for bp), the raw weights' beside an EMA's, and test at the end."""
    def accuracies(prefix):
        if f"{prefix}acc_ensemble" in record:
            line = " ".join(f"{name} {record[f'{prefix}acc_{name}']:.4f}"
                            for name in ("ensemble", "single", "multistep", "probe"))
        elif f"{prefix}acc" in record:
            line = f"acc {record[f'{prefix}acc']:.4f}"
        else:
            return ""
        raw = next((k for k in (f"{prefix}raw_acc_ensemble", f"{prefix}raw_acc") if k in record), None)
        return line + (f" (raw weights {record[raw]:.4f})" if raw else "")
    parts = [f"loss {record['loss']:.4f}"]
    parts += [f"{name} {text}" for name, text in (("val", accuracies("val_")), ("TEST", accuracies(""))) if text]
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------
# Classification data readers (used unchanged by the CNN, ViT and fine-tuning scripts)
# ----------------------------------------------------------------------------------------------
class DataError(RuntimeError):
    """Data that is missing or unreadable; the message is one line naming the path and the fix."""


class TensorImages(torch.utils.data.Dataset):
    """In-memory images [N, C, H, W] float in [0, 1] with labels; transform applied per item."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform else x), int(self.labels[i])


def digits_split(seed=0, test_fraction=0.2):
    """scikit-learn's 1797 real 8x8 handwritten digits (ships with the package, no network),
    stratified split into train / held-out test (20%, fixed seed). Returns ((x, y), (x, y)) with x
    [N, 1, 8, 8] float in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(data.target)
    tr, te = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                              stratify=data.target)
    return (images[tr], labels[tr]), (images[te], labels[te])


DATA_HINTS = {
    "cifar10": "torchvision downloads it when online; offline, put cifar-10-batches-py/ under --data",
    "cifar100": "torchvision downloads it when online; offline, put cifar-100-python/ under --data",
    "mnist": "torchvision downloads it when online; offline, put MNIST/raw/*-ubyte files under --data",
    "tinyimagenet": "download tiny-imagenet-200.zip (cs231n.stanford.edu) and unzip it under --data",
    "imagenet-r": "download imagenet-r.tar (github.com/hendrycks/imagenet-r) and extract it under --data",
}


def validation_indices(n, fraction=0.1, cap=5000, seed=0):
    """The validation split carved from n training items: a fixed permutation (its own generator, the
    same for every run seed) cut into (train indices, val indices), both sorted; the validation part
    is round(fraction * n) items, at most `cap`, so a small real-format set still trains on most of
    its data."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(cap, round(fraction * n))
    return sorted(order[n_val:]), sorted(order[:n_val])


def with_transform(dataset, transform):
    """The same items read with another transform (a shallow copy: no second scan or load of the data),
    e.g. the training set as validation sees it."""
    import copy
    view = copy.copy(dataset)
    view.transform = transform
    return view


# validation fraction of each dataset's training part (digits: 20%, as 10% would be 144 images)
VAL_FRACTION = {"digits": 0.2}


def classification_data(name, root, train_transform=None, test_transform=None, download=True, val=True):
    """(train_set, val_set, test_set, num_classes) for digits | mnist | cifar10 | cifar100 |
    tinyimagenet | imagenet-r. Items are (image, label); transforms take a PIL image (tensor [C,H,W]
    for digits). The validation set is carved from the training data (`validation_indices`: 10%, at
    most 5,000; digits 20% of its 80% train part) and read with the test transform; it is never taken
    from test. val=False (a final run) trains on train + validation and returns val_set None.
    Raises DataError with one line when the data is missing and cannot be downloaded."""
    import torchvision
    if name == "digits":
        (xtr, ytr), (xte, yte) = digits_split()
        train = TensorImages(xtr, ytr, train_transform)
        train_plain = with_transform(train, test_transform)
        test, num_classes = TensorImages(xte, yte, test_transform), 10
    elif name in ("cifar10", "cifar100", "mnist"):
        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
               "mnist": torchvision.datasets.MNIST}[name]
        sets = []
        for train_split, tf in ((True, train_transform), (False, test_transform)):
            try:
                sets.append(cls(root, train=train_split, transform=tf, download=False))
            except RuntimeError:
                if not download:
                    raise DataError(f"{name} not found under {os.path.abspath(root)}: {DATA_HINTS[name]}")
                try:
                    sets.append(cls(root, train=train_split, transform=tf, download=True))
                except Exception as e:
                    raise DataError(f"{name} not found under {os.path.abspath(root)} and the download failed "
                                    f"({type(e).__name__}): {DATA_HINTS[name]}") from None
        train, test = sets
        train_plain = with_transform(train, test_transform)
        num_classes = {"cifar10": 10, "cifar100": 100, "mnist": 10}[name]
    elif name == "tinyimagenet":
        train, train_plain, test, num_classes = tinyimagenet(root, train_transform, test_transform)
    elif name == "imagenet-r":
        train, train_plain, test, num_classes = imagefolder_split(os.path.join(root, "imagenet-r"), train_transform,
                                                                  test_transform, name)
    else:
        raise DataError(f"unknown dataset {name!r}")
    if not val:
        return train, None, test, num_classes
    keep, held = validation_indices(len(train), VAL_FRACTION.get(name, 0.1))
    return Subset(train, keep), Subset(train_plain, held), test, num_classes


def load_image(path):
    """RGB PIL image; DataError naming the file when it is missing, truncated or not an image."""
    from PIL import Image
    try:
        with open(path, "rb") as f, Image.open(f) as im:
            return im.convert("RGB")
    except OSError as e:
        raise DataError(f"unreadable image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def tinyimagenet(root, train_transform, test_transform):
    """TinyImageNet in its standard layout: tiny-imagenet-200/train/<wnid>/images/*.JPEG and
    val/images/*.JPEG labelled by val/val_annotations.txt (its val split is the test set here).
    Returns (train, train with the test transform, test, num_classes)."""
    import torchvision
    base = os.path.join(root, "tiny-imagenet-200")
    train_dir, val_dir = os.path.join(base, "train"), os.path.join(base, "val")
    ann = os.path.join(val_dir, "val_annotations.txt")
    if not (os.path.isdir(train_dir) and os.path.isfile(ann)):
        raise DataError(f"tinyimagenet not found under {os.path.abspath(base)}: {DATA_HINTS['tinyimagenet']}")
    train = torchvision.datasets.ImageFolder(train_dir, train_transform, loader=load_image)
    samples = []
    with open(ann) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in train.class_to_idx:
                samples.append((os.path.join(val_dir, "images", parts[0]), train.class_to_idx[parts[1]]))
    plain = with_transform(train, test_transform)
    test = torchvision.datasets.ImageFolder(train_dir, test_transform, loader=load_image)  # same classes, new samples
    test.samples = test.imgs = samples
    test.targets = [s[1] for s in samples]
    return train, plain, test, len(train.classes)


def imagefolder_split(folder, train_transform, test_transform, name, test_fraction=0.2, seed=0):
    """An ImageFolder tree (class folders of images) split into train / test (20%, fixed seed),
    the usual protocol for ImageNet-R, which ships without a split. Returns (train, train with the
    test transform, test, num_classes)."""
    import torchvision
    if not os.path.isdir(folder):
        raise DataError(f"{name} not found at {os.path.abspath(folder)}: {DATA_HINTS.get(name, 'see README')}")
    try:
        full = torchvision.datasets.ImageFolder(folder)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{name} at {os.path.abspath(folder)} holds no images ({str(e).splitlines()[0]})") from None
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(len(order) * (1 - test_fraction))
    train, test = (torchvision.datasets.ImageFolder(folder, tf, loader=load_image)
                   for tf in (train_transform, test_transform))
    return Subset(train, order[:cut]), Subset(test, order[:cut]), Subset(test, order[cut:]), len(full.classes)
