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
import math
import os
import random
import tempfile

import numpy as np
import timm.models.vision_transformer
import torch
import torch.nn as nn
import torch.nn.functional as F


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


class WithIndex(torch.utils.data.Dataset):
    """Wraps a dataset so items come as (*item, index): per-sample z0 needs the index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a loadable checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no 'model' entry)")
    return state


def truncate_log(path, epochs):
    """On resume: keep the JSON-lines log's first `epochs` epoch records (a run killed between its
    log line and its checkpoint would otherwise log that epoch twice)."""
    if not os.path.exists(path):
        return
    import json
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
    checkpoint's epoch. Refuses to start over an existing checkpoint. Returns the first epoch to
    run; CheckpointError with one line on any problem."""
    log_path = os.path.splitext(out)[0] + ".jsonl"
    if not resume:
        if os.path.exists(out):
            raise CheckpointError(f"{out} exists; pass --resume to continue it or choose another --out")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        open(log_path, "w").close()
        return 0
    state = load_for_resume(out, script, args, arch)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
    truncate_log(log_path, state["epoch"] + 1)
    return state["epoch"] + 1


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
    The paper's 'deep residual MLP (hidden 1024, LayerNorm, Dropout)' of D.2."""

    def __init__(self, in_dim, hidden, out_dim, blocks=2, dropout=0.1):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(hidden, hidden))
            for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))

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
def sample_t(n, head, T, time_split, device, dist="uniform"):
    """t per sample: 'uniform' U[0, 1] (the paper); 'early' u^2 (density 1 / (2 sqrt t): more training
    where z_t says little about z1 and the head must read the image); 'zero' t = 0 always (each head
    learns the one-step map z0 -> z1 used by single-step and ensemble inference). With time_split,
    head k draws from [k/T, (k+1)/T), the interval it owns in multi-step inference (eq. 24). [n]."""
    u = torch.rand(n, device=device)
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
                       reduction="mean", detach_target=False, z0=None, t=None, t_dist="uniform"):
    """The flow part of head k's local loss.

    head(zt, feat, t) -> v. z1: [B, ...] targets. Returns (mse, z1_hat).
    mse: squared error between v and u. reduction 'mean' averages over every element (the 'Mean
    Squared Error' of A.1.1, on the scale of the CE term); 'sum' sums over latent dimensions and
    averages over the batch (the ||.||^2 of Algorithm 1, d times larger).
    detach_target: the head's input zt and the regression target u see z1 through a stop-gradient,
    so the flow loss cannot move the targets (the collapse guard, see ClassEmbedding); z1_hat still
    carries the gradient d z1_hat / d z1 = t, so the anchor (task) loss does move them.
    """
    z1_flow = z1.detach() if detach_target else z1
    z0 = torch.randn_like(z1) if z0 is None else z0
    t = sample_t(z1.shape[0], head_index, T, time_split, z1.device, t_dist) if t is None else t
    zt, u = path(z0, z1_flow, t, sigma_min)
    v = head(zt, feat, t)
    err = (v - u).to(torch.promote_types(v.dtype, torch.float32)) ** 2  # fp32 at least, also under bf16
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

    def head_loss(self, k, feats, y, lam=1.0, time_split=False, sigma_min=0.0, reduction="mean"):
        """L_k = MSE + lam * CE(W_cls^T z1_hat, y) (eq. 19) for head k on backbone features `feats`."""
        mse, z1_hat = flow_matching_loss(self.heads[k], feats[self.head_stage[k]], self.embed(y), k, self.T,
                                         time_split, sigma_min, reduction, detach_target=self.embed.guard)
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


def blockwise_backward(features, head_ids, head_loss):
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
    pairs = [(f, leaf.grad) for f, leaf in zip(features, leaves) if leaf.grad is not None]
    if pairs:
        torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
    return losses


def classifier_step(model, x, y, heads, device, amp=False, lam=1.0, time_split=False, sigma_min=0.0,
                    reduction="mean"):
    """One training step without the optimiser, for classification.

    FlowClassifier: backbone forward once, then `blockwise_backward` over `heads` (all T in the
    parallel schedule, [k] in the sequential one) with each head's local loss, then the detached
    probe. Any other model (the bp baselines): cross-entropy of model(x), one joint backward.
    Returns {'loss': mean head loss, 'probe', 'loss_h{k}'} or {'loss'}; NonFiniteLoss on NaN/inf.
    """
    with autocast(device, amp):
        if not isinstance(model, FlowClassifier):
            loss = F.cross_entropy(model(x).float(), y)
            if not math.isfinite(loss.item()):
                raise NonFiniteLoss("bp", loss.item())
            loss.backward()
            return {"loss": loss.item()}
        feats = model.backbone(x)
        losses = blockwise_backward(feats, heads, lambda k, f: model.head_loss(
            k, f, y, lam, time_split, sigma_min, reduction))
        probe = model.probe_loss(feats, y)
    probe.backward()
    return {"loss": sum(losses.values()) / len(losses), "probe": probe.item(),
            **{f"loss_h{k}": v for k, v in losses.items()}}


def clip_and_step(optimizer, params, clip=1.0):
    """Gradient clipping at `clip` (paper D: 1.0), then the optimiser step. Returns the grad norm."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else torch.tensor(0.0)
    optimizer.step()
    return float(norm)


def make_ema(model, decay):
    """Weight EMA (paper: CNN 0.995) with torch's own AveragedModel; buffers (BN stats) averaged too."""
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)


def warmup_cosine(optimizer, warmup_steps, total_steps):
    """Linear warmup to the base lr, then cosine to 0 (paper D.2 from-scratch schedule)."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
def integrate(velocity, z0, T, steps=None, method="euler", return_path=False):
    """Solve dz/dt = v(z, t) from t = 0 to 1 with the piecewise field of eq. 24.

    steps = T (default) with Euler is eq. 25: head k on step k. More steps assign heads by interval.
    method: 'euler', 'heun' (2nd order, trapezoidal corrector) or 'midpoint'. A stage evaluated at
    time s uses head_for_time(s); Heun's corrector at the end of an interval uses the same head as
    the predictor so each step stays within one head. return_path: also the latent after each step.
    """
    steps = steps or T
    dt = 1.0 / steps
    z = z0
    trajectory = []
    ones = torch.ones(z0.shape[0], device=z0.device)
    for i in range(steps):
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

    z0 comes from `noise_for(index, seed)`, so results do not depend on batch size or sharding.
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
    return flow_metrics(hits, n, T, ks)


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
    return {("acc" if k == 1 else f"acc_top{k}"): h / n for k, h in zip(ks, hits)}


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


def classification_data(name, root, train_transform=None, test_transform=None, download=True):
    """(train_set, test_set, num_classes) for digits | mnist | cifar10 | cifar100 | tinyimagenet |
    imagenet-r. Items are (image, label); transforms take a PIL image (tensor [C,H,W] for digits).
    Raises DataError with one line when the data is missing and cannot be downloaded."""
    import torchvision
    if name == "digits":
        (xtr, ytr), (xte, yte) = digits_split()
        return TensorImages(xtr, ytr, train_transform), TensorImages(xte, yte, test_transform), 10
    if name in ("cifar10", "cifar100", "mnist"):
        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
               "mnist": torchvision.datasets.MNIST}[name]
        sets = []
        for train, tf in ((True, train_transform), (False, test_transform)):
            try:
                sets.append(cls(root, train=train, transform=tf, download=False))
            except RuntimeError:
                if not download:
                    raise DataError(f"{name} not found under {os.path.abspath(root)}: {DATA_HINTS[name]}")
                try:
                    sets.append(cls(root, train=train, transform=tf, download=True))
                except Exception as e:
                    raise DataError(f"{name} not found under {os.path.abspath(root)} and the download failed "
                                    f"({type(e).__name__}): {DATA_HINTS[name]}") from None
        return sets[0], sets[1], {"cifar10": 10, "cifar100": 100, "mnist": 10}[name]
    if name == "tinyimagenet":
        return tinyimagenet(root, train_transform, test_transform)
    if name == "imagenet-r":
        return imagefolder_split(os.path.join(root, "imagenet-r"), train_transform, test_transform, name)
    raise DataError(f"unknown dataset {name!r}")


def tinyimagenet(root, train_transform, test_transform):
    """TinyImageNet in its standard layout: tiny-imagenet-200/train/<wnid>/images/*.JPEG and
    val/images/*.JPEG labelled by val/val_annotations.txt (the val split is the test set)."""
    import torchvision
    base = os.path.join(root, "tiny-imagenet-200")
    train_dir, val_dir = os.path.join(base, "train"), os.path.join(base, "val")
    ann = os.path.join(val_dir, "val_annotations.txt")
    if not (os.path.isdir(train_dir) and os.path.isfile(ann)):
        raise DataError(f"tinyimagenet not found under {os.path.abspath(base)}: {DATA_HINTS['tinyimagenet']}")
    train = torchvision.datasets.ImageFolder(train_dir, train_transform)
    samples = []
    with open(ann) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1] in train.class_to_idx:
                samples.append((os.path.join(val_dir, "images", parts[0]), train.class_to_idx[parts[1]]))
    test = torchvision.datasets.ImageFolder(train_dir, test_transform)  # same classes, samples replaced
    test.samples = test.imgs = samples
    test.targets = [s[1] for s in samples]
    return train, test, len(train.classes)


def imagefolder_split(folder, train_transform, test_transform, name, test_fraction=0.2, seed=0):
    """An ImageFolder tree (class folders of images) split into train / test (20%, fixed seed),
    the usual protocol for ImageNet-R, which ships without a split."""
    import torchvision
    if not os.path.isdir(folder):
        raise DataError(f"{name} not found at {os.path.abspath(folder)}: {DATA_HINTS.get(name, 'see README')}")
    try:
        full = torchvision.datasets.ImageFolder(folder)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{name} at {os.path.abspath(folder)} holds no images ({str(e).splitlines()[0]})") from None
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(len(order) * (1 - test_fraction))
    train, test = (torchvision.datasets.ImageFolder(folder, tf) for tf in (train_transform, test_transform))
    return (torch.utils.data.Subset(train, order[:cut]), torch.utils.data.Subset(test, order[cut:]),
            len(full.classes))
