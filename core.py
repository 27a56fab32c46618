"""Discriminative Flow Matching (DFM): the method, then the plumbing every script shares.

Jha, Bamniya, Borthakur (2026), "Discriminative Flow Matching via Local Generative Predictors".
Symbols follow the paper (Sections 3 and A):

    z0 ~ N(0, I)                    noise latent, [B, d] (detection: [B, M, d])
    z1                              task target (class embedding W_embed[y], or M query embeddings)
    zt = (1 - t) z0 + t z1          linear (optimal-transport) path, t ~ U[0, 1] per sample   (eq. 3)
    u  = z1 - z0                    target velocity                                            (eq. 4)
    v_k(zt, f(x), t)                flow head k, k = 0..T-1 (the paper counts from 1)          (eq. 8)
    z1_hat = zt + (1 - t) v         the head's estimate of the path's end point                (eq. 15)
    L_k = MSE(v, u) + lambda * CE(W_cls^T z1_hat, y)                                           (eq. 19)

The method: time embedding, the two flow-head types, the class targets with their collapse guard,
time sampling, path and local loss, the block-wise backward (backbone + one head in memory, whatever
T is), single-step / ensemble / multi-step inference, and flow-map heads (SGFlow). Then, under their
labels: the classification step and evaluation the three classification scripts share, seeded noise,
data and weights helpers, checkpoints and resume, the process group, the saved-activation meter and the
epoch engine `train_one_epoch`. Core takes modules, tensors and keyword arguments; it never reads the
command line, prints or exits: each script's main() does that.
"""
import atexit
import contextlib
import copy
import json
import math
import os
import random
import signal
import tempfile
import time
import warnings
from fractions import Fraction

try:
    import fcntl
except ImportError:  # not on Windows: data_lock does not lock there
    fcntl = None

import numpy as np
import timm.models.vision_transformer
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Subset
from tqdm import tqdm

# torch's forward-mode AD (torch.func.jvp, the flow-map loss) loads decompositions through torch.jit.script
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)


# ==== The method (Section 3) ======================================================================
def at_least_fp32(x):
    """x in fp32, or in its own dtype if wider (losses and logits under bf16 autocast; float64 in the tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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
        angles = at_least_fp32(t)[:, None] * self.freqs[None]  # [B, freq_dim/2]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.mlp[0].weight.dtype))


class ResidualMLP(nn.Module):
    """in_dim -> hidden, `blocks` pre-LN residual blocks (LN, Linear, GELU, Dropout, Linear), LN -> out_dim: D.2's
    'deep residual MLP (hidden 1024, LayerNorm, Dropout)'; blocks = 0: its 'lighter, single-hidden-layer MLP'."""

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
    """v_k for pooled features (eqs. 7-8): v = ResidualMLP(concat(f(x), z_t + e_t)). Each head owns its
    time embedding, so head k's parameters see head k's loss only. feat [B, F], z [B, d], t [B] -> [B, d].
    maps=True: a flow-map head g(z, feat, t, u) that also embeds the target time u (e_t + e'_u)."""

    def __init__(self, feat_dim, dim, hidden=1024, blocks=2, dropout=0.1, maps=False):
        super().__init__()
        self.time = TimeEmbedding(dim)
        self.time_u = TimeEmbedding(dim) if maps else None
        self.mlp = ResidualMLP(feat_dim + dim, hidden, dim, blocks, dropout)

    def forward(self, z, feat, t, u=None):
        return self.mlp(torch.cat([feat, z + times(self, t, u)], dim=-1))


def times(head, t, u=None):
    """A head's time input: e_t, plus e'_u for a flow-map head (u: the time the map goes to)."""
    return head.time(t) if u is None else head.time(t) + head.time_u(u)


class TokenFlowHead(nn.Module):
    """v_k for an unpooled token sequence: z_t + e_t, projected to the token width, is a query token prepended
    to one timm transformer block over [query; tokens], its output projected back to R^d (one encoder layer,
    what bp stacks T times). tokens [B, N, D], z [B, d], t [B] -> [B, d]; maps=True: as MLPFlowHead."""

    def __init__(self, token_dim, dim, heads, mlp_ratio=4.0, dropout=0.0, maps=False):
        super().__init__()
        self.time = TimeEmbedding(dim)
        self.time_u = TimeEmbedding(dim) if maps else None
        self.inp = nn.Linear(dim, token_dim)
        self.block = timm.models.vision_transformer.Block(token_dim, heads, mlp_ratio, qkv_bias=True,
                                                          proj_drop=dropout)
        if maps:  # torch has no forward-mode AD for the fused CPU attention kernel; the flow-map loss needs it
            self.block.attn.fused_attn = False
        self.out = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, dim))

    def forward(self, z, tokens, t, u=None):
        query = self.inp(z + times(self, t, u))[:, None]  # [B, 1, D]
        return self.out(self.block(torch.cat([query, tokens], dim=1))[:, 0])


class ClassEmbedding(nn.Module):
    """Learnable class targets z1 = W_embed[y] with a collapse guard.

    The flow loss alone has a trivial minimum: if every class target moves to one point c, the target
    velocity c - z0 = (c - zt) / (1 - t) is a function of (zt, t) alone and a head drives the MSE to
    zero without looking at the image; gradient descent on W_embed goes there. The guard (default):
    rows are used at a fixed radius sqrt(d) (the typical norm of z0), z1 = sqrt(d) W[y] / ||W[y]||,
    and the flow MSE sees z1 through a stop-gradient, so only the anchor cross-entropy shapes the
    targets (and pushes them apart). guard=False is the paper's plain table (test_core.py shows it
    collapse)."""

    def __init__(self, num_classes, dim, guard=True):
        super().__init__()
        self.guard, self.radius = guard, math.sqrt(dim)
        self.weight = nn.Parameter(torch.randn(num_classes, dim))

    def table(self):
        """[C, d] all class targets."""
        return self.radius * F.normalize(self.weight, dim=-1) if self.guard else self.weight

    def forward(self, y):
        return self.table()[y]


def time_law(u, dist="uniform"):
    """t per sample [n] from its U[0, 1) draw u (`train_noise`): 'uniform' t = u (the paper); 'early' u^2 (more
    training near t = 0, where z_t says little about z1 and the head must read the image)."""
    return {"uniform": u, "early": u * u}[dist]


def path(z0, z1, t, sigma_min=0.0):
    """Lipman et al.'s OT path (sigma_min = 0 is eqs. 3-4). z0, z1 [B, ...], t [B] -> (zt, u)."""
    t = t.view(-1, *([1] * (z0.dim() - 1)))
    return (1 - (1 - sigma_min) * t) * z0 + t * z1, z1 - (1 - sigma_min) * z0


def endpoint(zt, v, t):
    """z1_hat = zt + (1 - t) v (eq. 15): one Euler step to t = 1 from wherever the latent is."""
    return zt + (1 - t.view(-1, *([1] * (zt.dim() - 1)))) * v


def flow_matching_loss(head, feat, z1, z0, t, sigma_min=0.0, reduction="mean", detach_target=False):
    """The flow part of head k's local loss: (mse, z1_hat) for head(zt, feat, t) -> v, targets z1 [B, ...] and
    the draws z0 [B, ...], t [B]. reduction 'mean' averages the squared error over every element (A.1.1's MSE,
    on the CE's scale), 'sum' sums over latent dims (Algorithm 1's ||.||^2). detach_target: zt and u see z1
    through a stop-gradient (the collapse guard); z1_hat still carries d z1_hat / d z1 = t for the anchor loss."""
    z1_flow = z1.detach() if detach_target else z1
    zt, u = path(z0, z1_flow, t, sigma_min)
    v = head(zt, feat, t)
    err = at_least_fp32(v - u) ** 2
    mse = err.mean() if reduction == "mean" else err.flatten(1).sum(1).mean()
    z1_hat = endpoint(zt, v, t)
    if detach_target:  # same value; routes the anchor gradient into z1 through zt's t * z1 term
        z1_hat = z1_hat + t.view(-1, *([1] * (z1.dim() - 1))) * (z1 - z1_flow)
    return mse, z1_hat


def sample_tu(head, T, span, draws, diag=0.25, dist="uniform"):
    """(t, u), t <= u, per sample for flow-map head k = `head` from U[0, 1) draws [n, 3]: t = u (where SGFlow is flow
    matching) with probability `diag`, else the two draws sorted (its Theorem 1 needs both), t under the law
    `dist` (`time_law`). span 'global': in [0, 1]; 'local': head k's interval [k/T, (k+1)/T]."""
    lo, hi = draws[:, :2].min(1).values, draws[:, :2].max(1).values
    lo = time_law(lo, dist)  # the start time under the law
    hi = torch.where(draws[:, 2] < diag, lo, hi)
    return ((head + lo) / T, (head + hi) / T) if span == "local" else (lo, hi)


def flow_map(g, z, feat, t, u):
    """f(t, u, z) = z + (u - t) g(z, feat, t, u): SGFlow's parametrisation of the map that moves a point
    of the path at time t to time u; on the diagonal g(z, feat, t, t) is the velocity. z [B, ...], t, u [B]."""
    return z + (u - t).view(-1, *([1] * (z.dim() - 1))) * g(z, feat, t, u)


def exact_layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm from primitive ops, for forward-mode AD: in torch <= 2.14 the backward through torch.func.jvp of
    the fused kernel takes its saved mean and rstd as constants and is wrong (pytorch/pytorch#196700)."""
    dims = tuple(range(-len(normalized_shape), 0))
    x = at_least_fp32(x)  # as autocast runs F.layer_norm
    xc = x - x.mean(dims, keepdim=True)
    y = xc * torch.rsqrt(xc.pow(2).mean(dims, keepdim=True) + eps)
    y = y if weight is None else y * weight
    return y if bias is None else y + bias


class ExactNorms(torch.overrides.TorchFunctionMode):
    """While active, every layer norm (nn.LayerNorm, timm's norms, a variant's own F.layer_norm) runs as
    `exact_layer_norm`, and a norm over batch or instance statistics (training-mode batch_norm, instance_norm), whose
    JVP backward is wrong too (#196699), raises: `sgflow_loss` forms its JVPs inside. group_norm, rms_norm, softmax,
    GELU and explicit attention are exact as they are; velocity heads never enter this mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.layer_norm, torch.layer_norm):
            return exact_layer_norm(*args, **kwargs)
        if func in (F.batch_norm, torch.batch_norm, F.instance_norm, torch.instance_norm):
            batch = func in (F.batch_norm, torch.batch_norm)  # all four take training / use_input_stats 6th
            if args[5] if len(args) > 5 else kwargs.get("training" if batch else "use_input_stats", not batch):
                raise ValueError("a flow-map head cannot normalise over batch or instance statistics (training-mode "
                                 "BatchNorm, InstanceNorm): backward through torch.func.jvp of them is wrong in "
                                 "torch; use LayerNorm, GroupNorm or RMSNorm")
        return func(*args, **kwargs)


def sgflow_loss(g, feat, z0, z1, t, u, split=True, v_hat=None):
    """SGFlow's loss (Key Designs 2-4) for a flow-map head g on the straight path X_t = (1 - t) z0 + t z1,
    Xdot = z1 - z0:  L_sg = || d_t f + (d_x f) Xdot ||^2 - || (d_x f)(Xdot - sg[g(X_t, t, t)]) ||^2,
    both terms Jacobian-vector products of f(., u, .) at (t, X_t) in the directions (1, Xdot) and
    (0, Xdot - sg[g]), by forward-mode AD (torch.func.jvp over functional_call, inside `ExactNorms`: no Jacobian,
    no model inversion, no backprop through nested model calls); the usual backward then differentiates them.
    Squared norms are averaged over latent dims (the flow MSE's scale). split: even rows take the first
    direction, odd the second, each term averaged over its own rows (one JVP per sample, unbiased for any batch
    size; one sample takes both); False: both for all. v_hat [B, ...]: sg[g] when given (tests hold it fixed).
    Returns (loss, X_t)."""
    xt, xdot = path(z0, z1, t)
    if v_hat is None:
        with torch.no_grad():
            v_hat = g(xt, feat, t, t)  # sg[g(t, t, X_t)]: the model's own velocity estimate
    params = dict(g.named_parameters()) if isinstance(g, nn.Module) else {}

    def f(tt, xx):
        call = (lambda *a: torch.func.functional_call(g, params, a)) if params else g
        return flow_map(call, xx, feat, tt, u)
    if split and len(t) > 1:
        first = torch.arange(len(t), device=t.device) % 2 == 0
        t_in, points, dt = t, xt, first.to(t.dtype)
        dx = torch.where(first.view(-1, *([1] * (xt.dim() - 1))), xdot, xdot - v_hat)
    else:
        t_in, points, u = torch.cat([t, t]), torch.cat([xt, xt]), torch.cat([u, u])
        feat = torch.cat([feat, feat]) if feat is not None else None
        dt, dx = torch.cat([torch.ones_like(t), torch.zeros_like(t)]), torch.cat([xdot, xdot - v_hat])
        first = torch.arange(2 * len(t), device=t.device) < len(t)
    with ExactNorms():
        _, d = torch.func.jvp(f, (t_in, points), (dt, dx))
    sq = at_least_fp32(d).pow(2).flatten(1).mean(1)
    ones = first.to(sq.dtype)  # each term averaged over its own rows
    return (sq * (ones / ones.sum() - (1 - ones) / (1 - ones).sum())).sum(), xt


class FlowClassifier(nn.Module):
    """Backbone + T flow heads + class targets + W_cls + a detached linear probe (classification).
    backbone(x) returns one feature tensor per stage (pooled [B, F_s] or tokens [B, N, D]); head k
    reads stage head_stage[k] (the last for all heads unless given: the 'parallel' topology)."""

    def __init__(self, backbone, heads, num_classes, dim, head_stage=None, probe_dim=None, guard=True,
                 objective="velocity", span="global"):
        super().__init__()
        self.backbone, self.heads, self.dim = backbone, nn.ModuleList(heads), dim
        # objective 'flowmap': the heads are flow maps g(z, feat, t, u) (SGFlow), covering [0, 1] each
        # (span 'global') or head k its own interval [k/T, (k+1)/T] ('local')
        self.objective, self.span = objective, span
        norms = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)  # JVP backward wrong
        if objective == "flowmap" and any(isinstance(m, norms) for m in self.heads.modules()):
            raise ValueError("flow-map heads cannot hold BatchNorm or InstanceNorm (see ExactNorms); use LayerNorm")
        self.head_stage = list(head_stage) if head_stage is not None else [-1] * len(heads)
        self.embed = ClassEmbedding(num_classes, dim, guard)
        self.cls = nn.Linear(dim, num_classes, bias=False)  # W_cls (eqs. 16, 29)
        self.probe = nn.Linear(probe_dim, num_classes)  # A.3.5, trained on detached features

    @property
    def T(self):
        return len(self.heads)

    def head_loss(self, k, feats, y, z0, t, lam=1.0, sigma_min=0.0, reduction="mean"):
        """L_k = MSE + lam * CE(W_cls^T z1_hat, y) (eq. 19) of head k on `feats`, for draws z0 [B, d] and t [B]."""
        mse, z1_hat = flow_matching_loss(self.heads[k], feats[self.head_stage[k]], self.embed(y), z0, t, sigma_min,
                                         reduction, detach_target=self.embed.guard)
        return mse + lam * F.cross_entropy(self.logits(z1_hat), y)

    def map_loss(self, k, feats, y, z0, t, u, lam=1.0, split=True, sg_features=True):
        """The flow-map head's local loss: SGFlow's L_sg on the path to z1 = W_embed[y] (through the guard's
        stop-gradient) + lam * CE(W_cls^T z1_hat, y) on the endpoint estimate z1_hat = f(t, 1, X_t).
        z0 [B, d], (t, u) [B] from `sample_tu`. sg_features False: L_sg reads the features through a
        stop-gradient (the backbone learns from the anchor only; see the fine-tuning notes)."""
        g, feat, z1 = self.heads[k], feats[self.head_stage[k]], self.embed(y)
        z1_flow = z1.detach() if self.embed.guard else z1
        sg, xt = sgflow_loss(g, feat if sg_features or feat is None else feat.detach(), z0, z1_flow, t, u, split)
        end = torch.full_like(t, float(k + 1) / self.T if self.span == "local" else 1.0)
        z1_hat = flow_map(g, xt, feat, t, end)
        if self.span == "local":  # the map reaches the end of the head's interval; on to t = 1 by one Euler step
            z1_hat = endpoint(z1_hat, g(z1_hat, feat, end, end), end)
        z1_hat = z1_hat + t[:, None] * (z1 - z1_flow)  # the anchor's gradient into the targets, as flow_matching_loss
        return sg + lam * F.cross_entropy(self.logits(z1_hat), y)

    def flow_map(self, k, z, feats, t, u):
        return flow_map(self.heads[k], z, feats[self.head_stage[k]], t, u)

    def probe_loss(self, feats, y):
        """Cross-entropy of the linear probe on detached, pooled last-stage features (eq. 32)."""
        return F.cross_entropy(self.probe(pool(feats[-1]).detach()).float(), y)

    def velocity(self, k, z, feats, t):
        return self.heads[k](z, feats[self.head_stage[k]], t)

    def logits(self, z):
        """W_cls^T z (eqs. 16, 29), in fp32 at least."""
        out = self.cls(z.to(self.cls.weight.dtype))
        return at_least_fp32(out)


def pool(feat):
    """Tokens [B, N, D] -> mean over N; pooled [B, F] unchanged (probes, geometry)."""
    return feat.mean(1) if feat.dim() == 3 else feat


class NonFiniteLoss(RuntimeError):
    """A head's loss is NaN or inf; names the head (and, from `train_one_epoch`, the step)."""

    def __init__(self, head, value):
        super().__init__(f"non-finite loss {value} in head {head}")
        self.head, self.step = head, None


def blockwise_backward(features, head_ids, head_loss, all_features=False):
    """Accumulate the gradients of sum_k head_loss(k) holding at most one head's graph at a time.
    features: backbone outputs, attached to its graph; head_ids: the heads this batch trains;
    head_loss(k, leaves) -> head k's scalar loss from `leaves`, detached copies of `features` that collect
    d loss / d features. Each head runs forward and backward (its graph is freed), then one backward runs
    through the backbone with the summed feature gradient: peak saved activations = backbone + one head
    whatever T is, and the backbone gradient is that of sum_k L_k (chain rule). all_features: also zeros
    from features no head read (under DDP every backbone parameter gets a gradient). The losses come to
    the host once (one synchronisation per step); NaN or inf raises NonFiniteLoss naming the first such
    head, before any optimiser step. Returns {k: loss value}."""
    leaves = [f.detach().requires_grad_(f.requires_grad) for f in features]
    losses = []
    for k in head_ids:
        loss = head_loss(k, leaves)
        loss.backward()
        losses.append(loss.detach().float())
    pairs = [(f, leaf.grad if leaf.grad is not None else torch.zeros_like(f))
             for f, leaf in zip(features, leaves) if f.requires_grad and (leaf.grad is not None or all_features)]
    values = torch.stack(losses).tolist()
    for k, value in zip(head_ids, values):
        if not math.isfinite(value):
            raise NonFiniteLoss(k, value)
    if pairs:
        torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
    return dict(zip(head_ids, values))


def joint_backward(loss, name="bp"):
    """bp's one backward through the whole model, after the step's one read-back to the host; NonFiniteLoss
    (naming `name`) before it if the loss is NaN or inf. Returns {"loss": value}."""
    value = loss.item()
    if not math.isfinite(value):
        raise NonFiniteLoss(name, value)
    loss.backward()
    return {"loss": value}


def head_for_time(t, T):
    """Head that owns time t in the piecewise field (eq. 24, counted from 0): floor(T t), clamped."""
    return min(int(math.floor(T * t + 1e-9)), T - 1)


@torch.no_grad()
def single_step(velocity, z0, k):
    """z1_hat = z0 + v_k(z0, 0) (eq. 26). velocity(k, z, t[B]) -> v."""
    return z0 + velocity(k, z0, torch.zeros(z0.shape[0], device=z0.device))


@torch.no_grad()
def ensemble(velocity, z0, T):
    """Mean of the T single-step estimates (eqs. 27-28)."""
    return torch.stack([single_step(velocity, z0, k) for k in range(T)]).mean(0)


@torch.no_grad()
def integrate(velocity, z0, T, steps=None, method="euler", return_path=False, stop=None):
    """Solve dz/dt = v(z, t) from t = 0 to 1 in the piecewise field of eq. 24 (Euler, steps = T: eq. 25). A step
    uses the head owning its midpoint for all its stages (steps = 5, T = 3: heads 0, 0, 1, 2, 2). method 'euler',
    'heun' or 'midpoint'. return_path: also the latent after each step. stop: the state after `stop` steps."""
    steps = steps or T
    dt, z, trajectory = 1.0 / steps, z0, []
    ones = torch.ones(z0.shape[0], device=z0.device)
    for i in range(steps if stop is None else stop):
        t = i * dt
        k = head_for_time(t + 0.5 * dt, T)
        v = velocity(k, z, ones * t)
        if method == "euler":
            z = z + dt * v
        elif method == "heun":
            z = z + 0.5 * dt * (v + velocity(k, z + dt * v, ones * (t + dt)))
        elif method == "midpoint":
            z = z + dt * velocity(k, z + 0.5 * dt * v, ones * (t + 0.5 * dt))
        else:
            raise ValueError(f"unknown ODE method {method!r}")
        trajectory.append(z)
    return (z, trajectory) if return_path else z


@torch.no_grad()
def compose(flow_map, z0, T, steps, span="global"):
    """Flow-map inference in `steps` jumps on the grid t_i = i / steps: z_(i+1) = f(t_i, t_(i+1), z_i) with
    flow_map(k, z, t[B], u[B]) -> the point at u. span 'global': step i goes to the head owning its midpoint
    (as `integrate`); 'local' (head k maps within [k/T, (k+1)/T]): the grid is also cut at the interval
    bounds, one piece per head, so one step is T jumps. Exact maps give the same endpoint for any `steps`."""
    cuts = {Fraction(i, steps) for i in range(steps + 1)} | ({Fraction(k, T) for k in range(T + 1)} if span == "local"
                                                              else set())
    cuts, z, ones = sorted(cuts), z0, torch.ones(z0.shape[0], device=z0.device)
    for a, b in zip(cuts[:-1], cuts[1:]):
        z = flow_map(head_for_time(float(a + b) / 2, T), z, ones * float(a), ones * float(b))
    return z


# ==== Classification: the step and the evaluation the three classification scripts share ======
MAP_STEPS = (1, 2, 4, 8)  # the step counts a flow-map run logs (acc_steps_n)


def topk_correct(logits, y, ks=(1, 5)):
    """Number of samples whose label is in the top-k logits, for each k (k capped at #classes)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == y[:, None]
    return [int(hit[:, :min(k, logits.shape[-1])].any(-1).sum()) for k in ks]


def topk_for(num_classes):
    """The top-k accuracies to log: top-1, top-5, and top-10 from 100 classes on (Tables 4-5)."""
    return (1, 5, 10) if num_classes >= 100 else (1, 5)


@torch.no_grad()
def evaluate_classifier(model, loader, device, seed=0, amp=False, ks=(1, 5)):
    """Top-k accuracy on a loader of (x, y, index), summed over processes (each evaluates its `shard`).
    FlowClassifier: z0 = noise_for(index, seed), so results do not depend on batch size or sharding;
    acc_single (mean over heads; per head in acc_single_heads), acc_ensemble, acc_multistep (Euler,
    T steps) and acc_probe. Flow-map heads: the single step of head k is f_k(0, 1, z0) (span 'local':
    the one-step composition for every head, as no head maps all of [0, 1]), the ensemble their mean,
    multistep `compose` with T steps, and acc_steps_n with n in MAP_STEPS. Any other model (bp): acc.
    Top-k for k > 1 adds the suffix _top{k}."""
    model.eval()
    flow = isinstance(model, FlowClassifier)
    maps = flow and model.objective == "flowmap"
    names = (["ensemble", "multistep", "probe"] + [f"h{k}" for k in range(model.T)]
             + ([f"steps_{n}" for n in MAP_STEPS] if maps else [])) if flow else ["acc"] + ["probe"] * hasattr(model, "outputs")
    hits, n = {name: [0] * len(ks) for name in names}, 0
    for x, y, idx in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            if flow:
                feats = model.backbone(x)
                z0 = noise_for(idx, (model.dim,), seed, device)
                if maps:
                    mapping = lambda k, z, t, u: model.flow_map(k, z, feats, t, u).float()  # noqa: E731
                    zero, one = torch.zeros(len(z0), device=device), torch.ones(len(z0), device=device)
                    singles = ([mapping(k, z0, zero, one) for k in range(model.T)] if model.span == "global" else
                               [compose(mapping, z0, model.T, 1, model.span)] * model.T)
                    multistep = compose(mapping, z0, model.T, model.T, model.span)
                else:
                    velocity = lambda k, z, t: model.velocity(k, z, feats, t).float()  # noqa: E731
                    singles = [single_step(velocity, z0, k) for k in range(model.T)]
                    multistep = integrate(velocity, z0, model.T)
                outputs = {f"h{k}": model.logits(z) for k, z in enumerate(singles)}
                outputs["ensemble"] = model.logits(torch.stack(singles).mean(0))
                outputs["multistep"] = model.logits(multistep)
                outputs["probe"] = model.probe(pool(feats[-1]))
                for steps in MAP_STEPS if maps else ():
                    outputs[f"steps_{steps}"] = model.logits(compose(mapping, z0, model.T, steps, model.span))
            else:  # bp's logits; the comparison methods' read-out and probe
                outputs = model.outputs(x, idx, seed) if hasattr(model, "outputs") else {"acc": model(x)}
        for name, logits in outputs.items():
            hits[name] = [a + b for a, b in zip(hits[name], topk_correct(logits.float(), y, ks))]
        n += len(y)
    flat = all_sum([h for name in sorted(hits) for h in hits[name]] + [n])
    hits = {name: flat[i * len(ks):(i + 1) * len(ks)] for i, name in enumerate(sorted(hits))}
    out = {}
    for i, k in enumerate(ks):
        suffix = "" if k == 1 else f"_top{k}"
        if not flow:
            out.update({("acc" if name == "acc" else f"acc_{name}") + suffix: int(hits[name][i]) / int(flat[-1])
                        for name in hits})
            continue
        heads = [int(hits[f"h{h}"][i]) / int(flat[-1]) for h in range(model.T)]
        out[f"acc_single{suffix}"], out[f"acc_single_heads{suffix}"] = sum(heads) / model.T, heads
        for name in ("ensemble", "multistep", "probe") + tuple(f"steps_{n}" for n in MAP_STEPS if maps):
            out[f"acc_{name}{suffix}"] = int(hits[name][i]) / int(flat[-1])
    return out


def classification_summary(record):
    """The per-epoch line: validation top-1 (ensemble, single-step, multi-step and probe for fm; acc for bp),
    the raw weights' beside an EMA's, and test at the end."""
    def accuracies(prefix):
        names = ("ensemble", "single", "multistep", "probe") if f"{prefix}acc_ensemble" in record else \
            ("", "probe") if f"{prefix}acc_probe" in record else ("",)
        if f"{prefix}acc{'_' + names[0] if names[0] else ''}" not in record:
            return ""
        line = " ".join(f"{n or 'acc'} {record[f'{prefix}acc' + ('_' + n if n else '')]:.4f}" for n in names)
        if f"{prefix}acc_steps_1" in record:  # flow-map heads: top-1 with 1, 2, 4, 8 steps
            line += " steps " + "/".join(f"{record[f'{prefix}acc_steps_{n}']:.4f}" for n in MAP_STEPS)
        raw = next((k for k in (f"{prefix}raw_acc_ensemble", f"{prefix}raw_acc") if k in record), None)
        return line + (f" (raw weights {record[raw]:.4f})" if raw else "")
    return " | ".join([f"loss {record['loss']:.4f}"] + [f"{name} {text}" for name, text in
                                                        (("val", accuracies("val_")), ("TEST", accuracies(""))) if text])


def classifier_step(model, forward, x, y, index, heads, noise_key, *, amp=False, lam=1.0, diag=0.25,
                    t_dist="uniform", sigma_min=0.0, mse="mean", sg_features=True):
    """One training batch of a classifier, no optimiser step; returns the losses to log. x [B, ...], y [B],
    index [B] (dataset indices keying the noise; with noise_key = (seed, epoch, pass) from the engine).
    FlowClassifier: the backbone once, then `blockwise_backward` over `heads`, head k's local loss (eq. 19;
    `map_loss` for flow maps, (t, u) from `sample_tu` with `diag` and `t_dist`) on its own draws from
    `train_noise` (fresh ones when index or noise_key is None), then the detached probe. Any other model (bp):
    cross-entropy and one joint backward. forward: the DDP wrapper (`distribute`) or None."""
    device = x.device
    with autocast(device, amp):
        if hasattr(model, "local_step"):  # the comparison methods (below)
            return model.local_step(x, y, index, noise_key)
        if not isinstance(model, FlowClassifier):
            return joint_backward(F.cross_entropy((forward or model)(x).float(), y))
        feats = (forward or model.backbone)(x)

        def head_loss(k, f):  # every draw of head k is made here, from its own key
            key = lambda *part: None if noise_key is None else (*noise_key, k, *part)  # noqa: E731
            z0, u = train_noise(index, key(), (model.dim,), device, n=len(y))
            if model.objective == "flowmap":  # (t, u) of the map from three more uniform draws per sample
                t, u = sample_tu(k, model.T, model.span, uniforms(index, key(1), 3, len(y), device), diag, t_dist)
                return model.map_loss(k, f, y, z0, t, u, lam, sg_features=sg_features)
            return model.head_loss(k, f, y, z0, time_law(u, t_dist), lam, sigma_min, mse)
        losses = blockwise_backward(feats, heads, head_loss, all_features=forward is not None)
        probe = model.probe_loss(feats, y)
    probe.backward()  # its value stays on the device until the epoch's sums are read
    return {"loss": sum(losses.values()) / len(losses), "probe": probe.detach(),
            **{f"loss_h{k}": v for k, v in losses.items()}}


# ==== The comparison methods: Forward-Forward (SFF for the CNN, CFF for the ViT) and NoProp-DT ========
# Baselines of the paper's Figure 5 and Tables 4-5, on this project's backbones, data, engine and evaluation
# (`classifier_step` and `evaluate_classifier` dispatch to their `local_step` and `outputs`).
def effective_dimensionality(cov):
    """ED = tr(C)^2 / ||C||_F^2 of matrices C [..., c, c] (SFF; 1e-6 added to the denominator as its code)."""
    return torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) ** 2 / (cov.pow(2).sum((-2, -1)) + 1e-6)


def sff_loss(post, copies, consistency=0.5, diversity=0.5):
    """SFF's dimensionality-compression objective (Zhu et al. 2025) of one stage's output post [n * B, C, ...]: n noisy
    copies of B images, copy-major. consistency * mean_i ED(C_i) - diversity * ED(C): C_i the second moment of image i's
    responses over its copies and positions, C that of the copy-averaged responses over images and positions
    (uncentred, divided by count - 1, as SFF's code). Low ED per image, high across images; no negative samples."""
    c = post.shape[1]
    r = post.reshape(copies, -1, c, post[0, 0].numel())  # [n, B, C, P]
    per = r.permute(1, 2, 0, 3).flatten(2)  # [B, C, n * P]
    every = r.mean(0).transpose(0, 1).flatten(1)  # [C, B * P]
    ed_each = effective_dimensionality(per @ per.transpose(1, 2) / (per.shape[2] - 1))
    return consistency * ed_each.mean() - diversity * effective_dimensionality(every @ every.T / (every.shape[1] - 1))


def cff_loss(views, y, margin=0.0, temperature=0.15):
    """CFF's marginal supervised contrastive loss (Aghagolzadeh and Ezoji 2025): SupCon over the pooled features of every
    view (views: list of [B, F]) with the cosine of each positive pair (same label, not itself) raised by `margin`
    and capped at 1, at `temperature`; an anchor without positives contributes 0 to the mean over anchors."""
    f = F.normalize(at_least_fp32(torch.cat(views)), dim=1)
    labels = y.repeat(len(views))
    self_pair = torch.eye(len(f), dtype=torch.bool, device=f.device)
    positive = (labels[:, None] == labels[None, :]) & ~self_pair
    sim = f @ f.T
    sim = torch.where(positive, (sim + margin).clamp(max=1.0), sim) / temperature
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_pair, float("-inf")), dim=1, keepdim=True)
    return -(log_prob * positive).sum(1).div(positive.sum(1).clamp(min=1)).mean()


class ForwardForward(nn.Module):
    """Forward-Forward on this project's backbones: every stage (CNN) or block (ViT) learns from its own local loss on a
    detached input (backbone.local: no gradient crosses stages); a read-out and a linear probe learn on detached
    last-stage features, all in the same step (SFF and CFF train the read-out in a second phase).
    objective 'sff' (CNN; backbone(x, maps=True) -> (pooled features, stage maps)): `sff_loss` per stage on `copies`
    copies of each image, each with dropout `drop` on its pixels (SFF's noise, also at inference); the read-out is
    SFF's energy: a linear layer (dropout 0.5) on the flattened last maps, the mean over copies of its squared
    outputs as the logits. objective 'cff' (ViT): `cff_loss` per block on the mean-pooled tokens of two views (the
    batch holds [B, 2, C, H, W] from `TwoViews`; one view is used twice), margins linear from 0.4 to 0.1 over the
    blocks, temperature 0.15 (CFF's); the read-out a linear layer on the pooled last tokens."""

    def __init__(self, backbone, num_classes, objective, readout_dim, probe_dim, copies=4, drop=0.2):
        super().__init__()
        self.backbone, self.objective, self.copies, self.drop = backbone, objective, copies, drop
        backbone.local = True
        self.margins = np.linspace(0.4, 0.1, len(backbone.channels)).tolist()
        self.readout, self.probe = nn.Linear(readout_dim, num_classes), nn.Linear(probe_dim, num_classes)

    def noisy_copies(self, x, u):
        """SFF's input noise: `copies` copies of x [B, ...] (copy-major) with dropout from uniforms u [B, n * numel]."""
        keep = (u >= self.drop).view(len(x), self.copies, *x.shape[1:]).transpose(0, 1).flatten(0, 1)
        return x.repeat(self.copies, *[1] * (x.dim() - 1)) * keep / (1 - self.drop)

    def energy(self, maps):
        logits = self.readout(F.dropout(maps.flatten(1), 0.5, self.training)).float()
        return logits.view(self.copies, -1, logits.shape[-1]).pow(2).mean(0)

    def local_step(self, x, y, index, key):
        """One batch's local losses, read-out and probe, one backward (the detached inputs keep each stage's gradient its
        own); NonFiniteLoss before it. Returns the losses to log (loss_h<k>: stage k's)."""
        if self.objective == "sff":
            u = uniforms(index, key, self.copies * x[0].numel(), len(y), x.device)
            feats, maps = self.backbone(self.noisy_copies(x, u), maps=True)
            losses = [sff_loss(m.float(), self.copies) for m in maps]
            read = F.cross_entropy(self.energy(maps[-1].detach()), y)
            probe = F.cross_entropy(self.probe(feats[-1].detach()).float(), y.repeat(self.copies))
        else:
            views = [self.backbone(v) for v in (x.unbind(1) if x.dim() == 5 else (x, x))]
            losses = [cff_loss([pool(f[s]) for f in views], y, m) for s, m in enumerate(self.margins)]
            last = pool(views[0][-1]).detach()
            read = F.cross_entropy(self.readout(last).float(), y)
            probe = F.cross_entropy(self.probe(last).float(), y)
        joint_backward(sum(losses) + read + probe, f"{self.objective} stages or read-out")
        return {"loss": sum(losses).detach() / len(losses), "readout": read.detach(), "probe": probe.detach(),
                **{f"loss_h{k}": loss.detach() for k, loss in enumerate(losses)}}

    @torch.no_grad()
    def outputs(self, x, index, seed=0):
        """Logits of the method's read-out (acc) and of the probe. SFF: both on the noisy copies the stages learnt from
        (its 'sampling' inference; noise seeded per sample), the probe's averaged over the copies."""
        if self.objective == "sff":
            u = torch.special.ndtr(noise_for(index, (self.copies * x[0].numel(),), seed, x.device))
            feats, maps = self.backbone(self.noisy_copies(x, u), maps=True)
            probe = self.probe(feats[-1]).view(self.copies, len(x), -1).mean(0)
            return {"acc": self.energy(maps[-1]), "probe": probe}
        last = pool(self.backbone(x)[-1])
        return {"acc": self.readout(last), "probe": self.probe(last)}


class BlockFeatures(nn.Module):
    """NoProp's image paths as a backbone: one per block; returns each block's pooled last-stage features."""

    def __init__(self, paths):
        super().__init__()
        self.paths = nn.ModuleList(paths)
        self.channels = [p.channels[-1] for p in paths]

    def forward(self, x):
        return [path(x)[-1] for path in self.paths]


def noprop_schedule(T, s=0.008):
    """NoProp-DT's cosine schedule alpha_bar_t, t = 0..T, rising from 0 (z_0 pure noise) to at most 0.999 (z_T; the
    cap keeps SNR(T) finite): alpha_bar_t = cos^2(pi/2 (1 - t/T + s) / (1 + s)) / cos^2(pi/2 s / (1 + s))."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos(math.pi / 2 * (1 - t + s) / (1 + s)) ** 2 / math.cos(math.pi / 2 * s / (1 + s)) ** 2
    f[0] = 0.0
    return f.clamp(max=0.999)


class NoPropDT(nn.Module):
    """NoProp-DT (Li, Teh, Pascanu 2025): T blocks, each with its own image path (`paths`: this project's CNN) and a
    path for the noisy label embedding z_(t-1), fused by an MLP into class probabilities p; the block's estimate is
    u_hat = p W_embed. Block t learns alone: z_(t-1) ~ q(z_(t-1) | y) = N(sqrt(ab_(t-1)) u_y, (1 - ab_(t-1)) I) and
    L_t = (T / 2) eta (SNR(t) - SNR(t-1)) ||u_hat_t(z_(t-1), x) - u_y||^2; the output layer learns -log p(y | z_T),
    z_T ~ q(z_T | y) (the KL term is 0: ab_0 = 0). Inference: z_0 ~ N(0, I), z_t = a_t u_hat_t + b_t z_(t-1) +
    sqrt(c_t) eps (the Gaussian posterior's coefficients), the class from the output layer on z_T. Class embeddings
    W_embed: `ClassEmbedding` (guard: radius sqrt(d), and the denoising losses see W_embed through a stop-gradient:
    the output layer's cross-entropy shapes it; guard False: NoProp's plain learned table, trained by every term)."""

    def __init__(self, paths, feat_dim, num_classes, dim, hidden, eta=0.1, guard=True):
        super().__init__()
        T = len(paths)
        self.backbone, self.dim = BlockFeatures(paths), dim
        self.image = nn.ModuleList(nn.Sequential(nn.Linear(feat_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
                                   for _ in range(T))
        self.label = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
                                   for _ in range(T))
        self.fuse = nn.ModuleList(nn.Sequential(nn.Linear(2 * hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                                nn.Linear(hidden, num_classes)) for _ in range(T))
        self.embed = ClassEmbedding(num_classes, dim, guard)
        self.out, self.probe = nn.Linear(dim, num_classes), nn.Linear(feat_dim, num_classes)
        ab = noprop_schedule(T)
        snr = ab / (1 - ab)
        alpha = ab[:-1] / ab[1:]  # step t's alpha: ab_(t-1) / ab_t
        self.register_buffer("ab", ab.float())
        self.register_buffer("weight", (T / 2 * eta * (snr[1:] - snr[:-1])).float())
        self.register_buffer("coef", torch.stack([ab[1:].sqrt() * (1 - alpha), alpha.sqrt() * (1 - ab[1:]),
                                                  (1 - ab[1:]) * (1 - alpha)]).div(1 - ab[:-1]).T.float())

    @property
    def T(self):
        return len(self.fuse)

    def denoise(self, k, z, x, table, feat=None):
        """Block k's u_hat = softmax(fuse([image path(x), label path(z)])) W_embed; feat: its image features if known."""
        feat = self.backbone.paths[k](x)[-1] if feat is None else feat
        p = at_least_fp32(self.fuse[k](torch.cat([self.image[k](feat), self.label[k](z)], 1))).softmax(-1)
        return p @ table.to(p.dtype)

    def local_step(self, x, y, index, key):
        """Each block's loss with its own backward (`blockwise_backward`: one block's graph in memory), then the
        output layer's and the probe's cross-entropy. Returns the losses to log (loss_h<k>: block k's)."""
        table = self.embed.table()
        target_table = table.detach() if self.embed.guard else table
        last = []

        def block_loss(k, _):
            eps = train_noise(index, None if key is None else (*key, k), (self.dim,), x.device, n=len(y))[0]
            z = self.ab[k].sqrt() * target_table[y] + (1 - self.ab[k]).sqrt() * eps
            feat = self.backbone.paths[k](x)[-1]
            if k == self.T - 1:
                last.append(feat.detach())
            return self.weight[k] * (self.denoise(k, z, x, target_table, feat) - target_table[y]).pow(2).sum(1).mean()
        losses = blockwise_backward([], list(range(self.T)), block_loss)
        eps = train_noise(index, None if key is None else (*key, self.T), (self.dim,), x.device, n=len(y))[0]
        z_end = self.ab[-1].sqrt() * table[y] + (1 - self.ab[-1]).sqrt() * eps
        ce, probe = F.cross_entropy(self.out(z_end).float(), y), F.cross_entropy(self.probe(last[0]).float(), y)
        joint_backward(ce + probe, "output layer or probe")
        return {"loss": sum(losses.values()) / self.T, "output_ce": ce.detach(), "probe": probe.detach(),
                **{f"loss_h{k}": v for k, v in losses.items()}}

    @torch.no_grad()
    def outputs(self, x, index, seed=0):
        """The reverse process from z_0 = noise_for(index) (its per-step noise seeded alike): logits of the output layer
        on z_T (acc), and of the probe on the last block's image features."""
        noise, table = noise_for(index, (self.T + 1, self.dim), seed, x.device), self.embed.table()
        z = noise[:, 0]
        for k in range(self.T):
            a, b, c = self.coef[k]
            z = a * self.denoise(k, z, x, table) + b * z + c.sqrt() * noise[:, k + 1]
        return {"acc": self.out(z), "probe": self.probe(self.backbone(x)[-1])}


# ==== Plumbing: device, seeds, per-sample noise, data helpers =====================================
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device, enabled):
    """bf16 autocast on CPU or CUDA (no grad scaler needed for bf16)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _mix32(x):
    """Wellons' lowbias32 integer hash (a bijection of uint32) on Python ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


NOISE_TABLE, NOISE_WINDOW = 1 << 24, 1 << 18  # `table_normal`: 2^24 start offsets, rows of up to 2^18 draws
_noise_tables = {}  # device -> the table


def table_normal(indices, key, n, device="cpu"):
    """N(0, 1) draws [B, n], a function of (key, dataset index) only, for the whole batch in one gather on
    `device`: the shared noise table of evolution strategies (Salimans et al. 2017). One table of
    2^24 + 2^18 N(0, 1) draws per device (65 MiB, made once from a fixed seed); a sample's row is the
    window of n consecutive entries at offset (a * index + b) mod 2^24, with odd a and b hashed from the
    key: for one key, distinct indices (< 2^24) start at distinct offsets, and rows whose windows overlap
    are shifted copies, uncorrelated. indices [B] ints; key: a tuple of ints; n <= 2^18."""
    if n > NOISE_WINDOW:
        raise ValueError(f"table_normal draws at most {NOISE_WINDOW} numbers per sample, not {n}")
    device = torch.device(device)
    if device not in _noise_tables:
        gen = torch.Generator().manual_seed(0x5EED)
        _noise_tables[device] = torch.randn(NOISE_TABLE + NOISE_WINDOW, generator=gen).to(device)
    h = 0x811C9DC5
    for k in key:  # the key folded into 32 bits (Python integers: no device work)
        h = _mix32((h ^ int(k)) & 0xFFFFFFFF)
    a, b = _mix32(h ^ 0x9E3779B9) | 1, _mix32(h)
    # a blocking host-to-device copy would synchronise the GPU once per head; the draws never wait on it
    offsets = (torch.as_tensor(indices).to(device, non_blocking=True).to(torch.int64) * a + b) % NOISE_TABLE
    return _noise_tables[device].as_strided((NOISE_TABLE, n), (1, 1)).index_select(0, offsets)


def noise_for(indices, shape, seed=0, device="cpu", kind="auto"):
    """Evaluation z0 [B, *shape], seeded by each sample's dataset index (indices [B]): evaluation does
    not depend on the batch size or on how the data is sharded. kind 'host': a generator reseeded per
    sample on the host (the stream every CPU result in this repository was measured with); 'device':
    `table_normal`, one gather on the device; 'auto' (default): device on CUDA, host elsewhere (on a GPU
    the loop's per-sample host work and copy would rival the step itself; on CPU it keeps the stream)."""
    if kind == "host" or (kind == "auto" and torch.device(device).type != "cuda"):  # the original stream
        gen, out = torch.Generator(), torch.empty((len(indices), *shape))
        for row, idx in enumerate(indices.tolist()):
            gen.manual_seed(seed * 1_000_003 + int(idx))
            out[row] = torch.randn(shape, generator=gen)
        return out.to(device)
    return table_normal(indices, (seed, 0x5EED), math.prod(shape), device).view(len(indices), *shape)


def train_noise(indices, key, shape, device="cpu", kind="auto", n=None):
    """Training draws per sample, (z0 [B, *shape] ~ N(0, I), u [B] ~ U[0, 1)), a function of `key` (e.g.
    (seed, epoch, pass, head)) and the dataset index only: a global batch split over N processes draws
    exactly what one process draws for the whole batch. kind: 'host', 'device' or 'auto', as noise_for.
    The one place training noise is drawn: fresh draws of n rows from torch's RNG when indices or key is None."""
    if indices is None or key is None:
        return torch.randn((n, *shape), device=device), torch.rand(n, device=device)
    if kind == "host" or (kind == "auto" and torch.device(device).type != "cuda"):  # the original stream
        gen = torch.Generator()
        z0, u = torch.empty((len(indices), *shape)), torch.empty(len(indices))
        for row, idx in enumerate(indices.tolist()):
            gen.manual_seed(hash((*key, int(idx))) % (2 ** 63))
            z0[row] = torch.randn(shape, generator=gen)
            u[row] = torch.rand((), generator=gen)
        return z0.to(device), u.to(device)
    z = table_normal(indices, key, math.prod(shape) + 1, device)
    return z[:, :-1].reshape(len(z), *shape), torch.special.ndtr(z[:, -1])


def uniforms(indices, key, count, n, device="cpu"):
    """[n, count] U[0, 1) draws per sample from the `train_noise` stream of `key` (the normal CDF of its
    normals; fresh when indices or key is None)."""
    return torch.special.ndtr(train_noise(indices, key, (count,), device, n=n)[0])


class WithIndex(torch.utils.data.Dataset):
    """Items come as (*item, index): per-sample noise needs the index."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


class TwoViews(torch.utils.data.Dataset):
    """Items (image, label) with the image as [2, C, H, W]: two draws of the dataset's augmentation (CFF's two views)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        (a, y), (b, _) = self.dataset[i], self.dataset[i]
        return torch.stack([a, b]), y


class Seeded(torch.utils.data.Dataset):
    """Each item's random augmentation comes from the torch RNG seeded by (seed, epoch, index) in a forked
    RNG: it depends neither on batch size, processes, loader workers, nor where a run was resumed. An
    item is asked for as (epoch, index) by the training loader (`train_loader`: its persistent workers
    keep their own copy of the dataset), or as a plain index, read at `self.epoch`."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        epoch, i = i if isinstance(i, tuple) else (self.epoch, i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, int(i))) % (2 ** 63))
            return self.dataset[i]


class DataError(RuntimeError):
    """Data that is missing or unreadable; the message is one line naming the path and the fix."""


@contextlib.contextmanager
def data_lock(root):
    """Hold an exclusive lock on the data folder `root` (created if absent) while a run reads, downloads or writes
    there: independent processes started on one fresh --data (an fm and a bp run side by side) take turns, so
    the later ones find the first one's dataset or cache whole and reuse it; torchrun's ranks take turns alike.
    POSIX file lock (fcntl.flock) on root/.dfm.lock; without fcntl (Windows) no lock."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".dfm.lock"), "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


class TensorImages(torch.utils.data.Dataset):
    """In-memory images [N, C, H, W] in [0, 1] with labels; transform applied per item."""

    def __init__(self, images, labels, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.transform(self.images[i]) if self.transform else self.images[i]), int(self.labels[i])


def torchvision_sets(cls, name, root, train_tf, test_tf, hint, download=True):
    """(train, test) of a torchvision dataset with a `train=` flag (CIFAR, MNIST) under `root`, downloaded
    when absent and `download` (online), holding `data_lock(root)`; DataError with one line naming the first
    missing file (or the unreadable folder) and ending in `hint` when neither works."""
    sets = []
    with data_lock(root):
        for split, tf in ((True, train_tf), (False, test_tf)):
            try:
                sets.append(cls(root, train=split, transform=tf, download=False))
            except Exception as first:  # absent, partly extracted or corrupt
                try:
                    if not download:
                        raise first
                    sets.append(cls(root, train=split, transform=tf, download=True))
                except Exception as e:
                    missing = next((f for f in expected_files(cls, root) if not os.path.isfile(f)), None)
                    if missing:
                        raise DataError(f"{name}: {missing} is missing and was not downloaded ({type(e).__name__}): "
                                        f"{hint}") from None
                    reason = f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"
                    raise DataError(f"{name}: torchvision cannot read the files under {os.path.abspath(root)} "
                                    f"({reason}): {hint}") from None
            if len(sets[-1]) == 0:
                raise DataError(f"{name}: the {'train' if split else 'test'} set under {os.path.abspath(root)} holds "
                                f"no image: {hint}")
    return sets


def expected_files(cls, root):
    """The files torchvision's MNIST-style or CIFAR-style dataset class reads under root."""
    if hasattr(cls, "resources"):  # MNIST and its kin: raw/<name> unzipped
        folder = os.path.join(os.path.abspath(root), cls.__name__, "raw")
        return [os.path.join(folder, os.path.splitext(os.path.basename(url))[0]) for url, _ in cls.resources]
    folder = os.path.join(os.path.abspath(root), cls.base_folder)
    return [os.path.join(folder, f) for f, _ in cls.train_list + cls.test_list] + [os.path.join(folder, cls.meta["filename"])]


def image_folder(folder, transform, name, hint):
    """torchvision's ImageFolder over folder/<class>/*, images read by `load_image`; DataError with one line
    when the folder is absent or a class folder holds no image."""
    if not os.path.isdir(folder):
        raise DataError(f"{name}: {os.path.abspath(folder)} is missing: {hint}")
    try:
        return torchvision.datasets.ImageFolder(folder, transform, loader=load_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{name}: {os.path.abspath(folder)} holds no images ({str(e).splitlines()[0]}): {hint}") \
            from None


def tiny_imagenet(root, train_tf, test_tf, hint):
    """TinyImageNet's (train, test) from root/tiny-imagenet-200: train/<wnid>/images/*.JPEG, and its val split
    (val/images listed in val/val_annotations.txt) as the test set; DataError with one line for a missing
    folder or list, an empty one, or a listed image that is absent."""
    base = os.path.join(os.path.abspath(root), "tiny-imagenet-200")
    train = image_folder(os.path.join(base, "train"), train_tf, "tinyimagenet", hint)
    ann = os.path.join(base, "val", "val_annotations.txt")
    if not os.path.isfile(ann):
        raise DataError(f"tinyimagenet: {ann} is missing: {hint}")
    test = copy.copy(train)
    test.transform = test_tf
    with open(ann) as f:
        rows = [line.split("\t") for line in f]
    test.samples = test.imgs = [(os.path.join(base, "val", "images", r[0]), train.class_to_idx[r[1]])
                                for r in rows if len(r) >= 2 and r[1] in train.class_to_idx]
    test.targets = [s[1] for s in test.samples]
    if not test.samples:
        raise DataError(f"tinyimagenet: {ann} lists no image of a class in {base}/train: {hint}")
    missing = next((path for path, _ in test.samples if not os.path.isfile(path)), None)
    if missing:
        raise DataError(f"tinyimagenet: {missing} is listed in {ann} but absent: {hint}")
    return train, test


def load_image(path):
    """RGB PIL image; DataError naming the file when it is missing, truncated or not an image."""
    from PIL import Image
    try:
        with open(path, "rb") as f, Image.open(f) as im:
            return im.convert("RGB")
    except OSError as e:
        raise DataError(f"unreadable image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def validation_indices(n, fraction=0.1, cap=5000, seed=0):
    """A validation split carved from n training items: a fixed permutation (the same for every run
    seed) cut into sorted (train indices, val indices); round(fraction * n) validation items, at most `cap`."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(cap, round(fraction * n))
    return sorted(order[n_val:]), sorted(order[:n_val])


def with_transform(dataset, transform):
    """The same items read with another transform (a shallow copy, no second load): e.g. validation."""
    view = copy.copy(dataset)
    view.transform = transform
    return view


def digits_split(seed=0, test_fraction=0.2):
    """scikit-learn's 1797 real 8x8 handwritten digits (they ship with the package), split stratified
    into train / held-out test (20%, fixed seed): ((x, y), (x, y)), x [N, 1, 8, 8] in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    images, labels = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0, torch.tensor(data.target)
    tr, te = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=data.target)
    return (images[tr], labels[tr]), (images[te], labels[te])


class WeightsError(RuntimeError):
    """Weights that cannot be had or do not fit; one-line message."""


def load_weights(module, path, name, skip=(), new=None, state=None):
    """Load a local state dict (.safetensors, or a torch file; a {'model': ...} or {'state_dict': ...}
    wrapper is unwrapped; or `state`, already read from `path`) into `module`, keys starting with `skip`
    ignored on both sides, and keys of `module` containing `new` allowed to be absent from the file (they
    keep their values); WeightsError with one line naming the file when it cannot be read or does not
    fit exactly. Returns the absent keys."""
    if state is None:
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file
                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"cannot read weights file {path} ({type(e).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds no state dict")
    state = {k: v for k, v in state.items() if not (skip and k.startswith(skip))}
    own = {k: v for k, v in module.state_dict().items() if not (skip and k.startswith(skip))}
    absent = sorted(k for k in set(own) - set(state) if new and new in k)
    missing, unexpected = sorted(set(own) - set(state) - set(absent)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise WeightsError(f"{path} does not fit {name}: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                           f"wrong shape {shapes[:4]}")
    module.load_state_dict(state, strict=False)
    return absent


def start_from_run(model, path):
    """Start `model` from the weights of an earlier run of the same architecture (its checkpoint at `path`),
    e.g. flow-map heads from trained velocity heads (SGFlow used for distillation): a velocity run has no
    target-time embeddings e'_u, so theirs start with a zero last layer and g(z, f, t, u) = v(z, f, t) at
    first: the map starts as one Euler step, f(t, u, z) = z + (u - t) v. WeightsError when it does not fit."""
    absent = load_weights(model, path, "this model", new=".time_u.")
    for k, head in enumerate(getattr(model, "heads", [])):
        if any(key.startswith(f"heads.{k}.time_u.") for key in absent):
            nn.init.zeros_(head.time_u.mlp[-1].weight)
            nn.init.zeros_(head.time_u.mlp[-1].bias)


# ==== Plumbing: checkpoints and resume ============================================================
class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, not a checkpoint, or from another script/config."""


def save_checkpoint(state, path):
    """Atomic save: a temp file in the same folder, fsync, os.replace. A crash leaves the old or the new
    checkpoint, never a partial one."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp_", suffix=".pt")
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
    """torch.load with weights_only=True; CheckpointError with one line for a missing, pickled,
    truncated or foreign file."""
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


def log_path(out):
    """The JSON-lines log beside checkpoint `out`."""
    return os.path.splitext(out)[0] + ".jsonl"


def start_or_resume(out, script, flags, arch, resume, model, optimizer, scheduler, ema=None):
    """Begin a run at `out` (refusing to start over an existing checkpoint), or with resume=True restore
    model, optimiser, scheduler, EMA and RNG states from it, after checking that `script` wrote it with
    the same values of the architecture flags `arch` (names in the dict `flags`), and cut its log back
    to the checkpoint's epoch (a kill between log line and checkpoint would repeat an epoch). Returns
    (first epoch to run, the position inside it if a preempted run saved mid-epoch, else None)."""
    if not resume:
        if os.path.exists(out):
            raise CheckpointError(f"{out} exists; pass --resume to continue it or choose another --out")
        if is_main():
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            open(log_path(out), "w").close()
        return 0, None
    state = load_checkpoint(out)
    if state.get("script") != script:
        raise CheckpointError(f"{out} was written by {state.get('script')}, not {script}")
    diff = [k for k in arch if state.get("args", {}).get(k) != flags.get(k)]
    if diff:
        raise CheckpointError(f"{out} was trained with different {', '.join(diff)}")
    partial = state.get("partial")
    if partial and partial["world"] != world_size():
        raise CheckpointError(f"{out} was saved mid-epoch by {partial['world']} process(es); resume it with as many")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
    if is_main() and os.path.exists(log_path(out)):
        with open(log_path(out)) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) <= state["epoch"] + 1]
        with open(log_path(out), "w") as f:
            f.writelines(lines)
    return state["epoch"] + 1, partial


def save_run(out, model, optimizer, scheduler, ema, epoch, partial, script, flags, **extra):
    """Rank 0 writes everything a resume needs (atomically); every process waits until it is written.
    epoch: the last finished epoch; partial: the position inside the next one (a preempted run)."""
    if is_main():
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
                         "rng": rng_state(), "epoch": epoch, "partial": partial, "script": script, "args": flags,
                         **extra}, out)
    if world_size() > 1:
        dist.barrier()


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


# ==== Plumbing: one device or torchrun (DDP) ======================================================
def init_distributed(device_name="auto"):
    """This process's device; under torchrun (WORLD_SIZE > 1) it joins the process group too: NCCL with
    one GPU per process (cuda:LOCAL_RANK), gloo on CPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device_name == "auto" else \
        torch.device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # leave the group when the process ends (also by sys.exit): without it gloo's threads were sometimes
        # still running at exit and the process aborted ('terminate called without an active exception')
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return device


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    return rank() == 0


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(values):
    """Element-wise sum over processes of a list of numbers (the list itself with one process)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def shard(dataset):
    """This process's share of an evaluation set (every world-th item from its rank on, no padding)."""
    return dataset if world_size() == 1 else Subset(dataset, range(rank(), len(dataset), world_size()))


def distribute(model, method):
    """Under torchrun: (DDP wrapper, the parameters of `model` outside it); else (None, []). fm wraps the backbone
    (its one backward reduces once per step) and the heads, whose gradients `sync_gradients` reduces once per
    step; bp wraps the whole model; the comparison methods (several backwards per step) wrap nothing."""
    if world_size() == 1:
        return None, []
    if method not in ("fm", "bp"):
        return None, list(model.parameters())
    wrapped = model.backbone if method == "fm" else model
    device = next(model.parameters()).device
    forward = DistributedDataParallel(wrapped, device_ids=[device] if device.type == "cuda" else None)
    inside = {id(p) for p in wrapped.parameters()}
    return forward, [p for p in model.parameters() if id(p) not in inside]


def sync_gradients(params):
    """Average the gradients of `params` over processes in one all-reduce. A parameter no process
    touched keeps grad None (AdamW skips it); one some process touched gets the average, zeros standing
    in for the others, so a head that skipped a step cannot hang the rest."""
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


# ==== Plumbing: saved-activation meter ============================================================
class SavedActivationMeter:
    """Peak bytes of tensors saved for backward, once per storage, parameters excluded: the paper's
    'activation memory' on CPU, where there is no allocator peak to read. Inside `with meter:` a storage
    counts while a saved reference to it is alive (its graph has not been freed)."""

    def __init__(self, exclude=()):
        self.exclude = {p.untyped_storage().data_ptr() for p in exclude}
        self.live, self.current, self.peak = {}, 0, 0  # live: storage ptr -> [refcount, bytes]

    def _pack(self, tensor):
        meter = self

        class Saved:
            __slots__ = ("tensor", "key", "__weakref__")

            def __init__(self, t):
                self.tensor, self.key, base = t, None, t
                while torch._C._functorch.is_functorch_wrapped_tensor(base):  # forward-mode AD (torch.func.jvp)
                    base = torch._C._functorch.get_unwrapped(base)
                if base.device.type == "meta" or base._is_zerotensor():  # no memory behind it
                    return
                key = base.untyped_storage().data_ptr()
                if key in meter.exclude:
                    return
                self.key = key
                entry = meter.live.setdefault(self.key, [0, base.untyped_storage().nbytes()])
                if entry[0] == 0:
                    meter.current += entry[1]
                    meter.peak = max(meter.peak, meter.current)
                entry[0] += 1

            def __del__(self):
                if self.key is not None:
                    entry = meter.live[self.key]
                    entry[0] -= 1
                    if entry[0] == 0:
                        meter.current -= entry[1]
                        del meter.live[self.key]

        return Saved(tensor)

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def measure_step_memory(step_fn, model, device):
    """Peak memory of step_fn(model) (one forward + backward): the CUDA allocator's peak on GPU, saved
    activations on CPU. Runs on a deep copy with the RNG forked, so weights, BN statistics and the
    random stream are untouched (a resumed run stays bit-identical)."""
    model = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step_fn(model)
            torch.cuda.synchronize(device)
            return int(torch.cuda.max_memory_allocated(device))
        with SavedActivationMeter(exclude=list(model.parameters())) as meter:
            step_fn(model)
        return int(meter.peak)


# ==== Plumbing: the epoch engine (one device or torchrun, preemption, mid-epoch resume) ===========
def head_schedule(T, sequential):
    """The heads each pass of an epoch trains: one pass training all T (the parallel schedule), or T
    passes, pass k training head k (Algorithm 1, the sequential schedule)."""
    return [[k] for k in range(T)] if sequential and T > 1 else [list(range(T))]


def epoch_batches(dataset, bs, epoch, seed, drop_last):
    """This process's batches (lists of indices) for one pass: a permutation fixed by (seed, epoch) dealt
    round-robin to the processes, so N processes at batch bs see what one process sees at N * bs."""
    sampler = DistributedSampler(dataset, world_size(), rank(), shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, bs, drop_last))


def steps_per_pass(dataset, bs, seed=0, max_steps=0):
    """Optimiser steps in one pass over this process's share of `dataset` (capped by max_steps)."""
    steps = len(epoch_batches(dataset, bs, 0, seed, len(dataset) > bs * world_size()))
    return min(steps, max_steps) if max_steps else steps


class Preemption:
    """SIGTERM, the way schedulers preempt jobs, only sets a flag (`with Preemption() as p:`); the engine
    asks p.requested() after each step (the answer agrees across processes)."""

    EXIT_CODE = 128 + signal.SIGTERM  # 143: a job chain does not mistake a preempted run for a finished one

    def __enter__(self):
        self.flag, self._old = False, signal.signal(signal.SIGTERM, self._set)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)

    def _set(self, signum, frame):
        self.flag = True

    def requested(self):
        return self.flag if world_size() == 1 else all_sum([float(self.flag)])[0] > 0


class Preempted(Exception):
    """Raised by `train_one_epoch` after the step during which SIGTERM came; `position` is where to resume."""

    def __init__(self, position):
        super().__init__("preempted")
        self.position = position


class PassBatches(torch.utils.data.Sampler):
    """The batch sampler of a run's training loader: `train_one_epoch` sets the batches (lists of indices)
    and the pass number before each pass; for a Seeded dataset each index goes out as (pass, index)."""

    def __init__(self, tagged):
        super().__init__()
        self.tagged, self.batches, self.tag = tagged, [], 0

    def __iter__(self):
        return iter([[(self.tag, i) for i in b] for b in self.batches] if self.tagged else self.batches)

    def __len__(self):
        return len(self.batches)


def train_loader(train_set, workers=0, collate_fn=None, device="cpu"):
    """One DataLoader for a whole run: its worker processes persist across passes and epochs (a pass of
    Algorithm 1 no longer restarts them), while each pass's batch order and each item's augmentation stay
    fixed by (seed, epoch, pass, index), so a resumed run is still bit-identical. Its own generator keeps
    iterator creation off the global RNG."""
    return DataLoader(train_set, batch_sampler=PassBatches(isinstance(train_set, Seeded)), num_workers=workers,
                      collate_fn=collate_fn, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def _one_line(e):
    """The message of an exception raised in a DataLoader worker (which wraps it in a traceback)."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if lines and "Traceback" in str(e) else (lines[0] if lines else repr(e))


def train_one_epoch(model, train_step, passes, optimizer, scheduler, loader, epoch, *, bs, seed, clip=1.0,
                    max_steps=0, forward=None, local_params=(), ema=None, schedule_per_step=True, preempt=None,
                    resume=None, peak=None, epochs=None, bn_batches=0, bn_input=None):
    """One epoch over `loader` (a `train_loader`): for each pass (its heads from `passes`, e.g.
    `head_schedule`), the batches fixed by (seed, epoch, pass); per batch
    train_step(model, forward, batch, heads, noise_key) runs forward and
    backward (noise_key = (seed, epoch, pass) keys the per-sample noise), then the heads' gradients are
    reduced over processes (`local_params`), clipped, and the optimiser, per-step scheduler and EMA step.
    forward: the DDP wrapper (`distribute`) or None. resume: the position a preempted run saved. peak:
    the step memory measured so far (measured on the first step when None). bn_batches > 0: then `precise_bn`
    of the model's backbone (and the EMA's) on the epoch's first bn_batches batches, bn_input(batch) -> its input.
    Returns (mean of each logged loss, peak). Raises Preempted after the step during which SIGTERM came,
    NonFiniteLoss with .step set, DataError with one line for data a loader worker could not read."""
    device, train_set = next(model.parameters()).device, loader.dataset
    world = world_size()
    per_pass = steps_per_pass(train_set, bs, seed, max_steps)
    drop_last = len(train_set) > bs * world
    model.train()
    t0 = time.time() - (resume["elapsed"] if resume else 0.0)
    sums, count = (dict(resume["sums"]), resume["count"]) if resume else ({}, 0)
    bar = tqdm(total=len(passes) * per_pass, initial=count, desc=f"epoch {epoch + 1}/{epochs or '?'}", leave=False,
               disable=None if is_main() else True)
    try:
        for p in range(resume["pass"] if resume else 0, len(passes)):
            skip = resume["step"] if resume and p == resume["pass"] else 0
            order = epoch_batches(train_set, bs, epoch * len(passes) + p, seed, drop_last)
            key = (seed, epoch, p)
            loader.batch_sampler.batches, loader.batch_sampler.tag = order[skip:per_pass], epoch * len(passes) + p
            for i, batch in enumerate(loader, start=skip):
                optimizer.zero_grad(set_to_none=True)
                if peak is None:  # memory of one training step, measured once on a copy of the model
                    peak = measure_step_memory(lambda m: train_step(m, None, batch, passes[p], key), model, device)
                losses = train_step(model, forward, batch, passes[p], key)
                sync_gradients(local_params)
                clip_and_step(optimizer, model.parameters(), clip)
                if schedule_per_step:
                    scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                for name, value in losses.items():  # a tensor value is read once, with the epoch's sums
                    sums[name] = sums.get(name, 0.0) + (value.double() if torch.is_tensor(value) else value)
                count += 1
                bar.update()
                bar.set_postfix(loss=f"{losses['loss']:.3f}")
                if preempt is not None and preempt.requested():
                    raise Preempted({"epoch": epoch, "pass": p, "step": i + 1, "sums": sums, "count": count,
                                     "elapsed": time.time() - t0, "world": world})
    except NonFiniteLoss as e:
        e.step = count + 1
        raise
    except DataError as e:  # raised in a loader worker, it comes back with the worker's traceback
        raise DataError(_one_line(e)) from None
    finally:
        bar.close()
    if bn_batches:
        loader.batch_sampler.batches = epoch_batches(train_set, bs, epoch * len(passes), seed, drop_last)[:bn_batches]
        loader.batch_sampler.tag = epoch * len(passes)
        precise_bn([getattr(m, "backbone", m) for m in [model] + ([ema.module] if ema is not None else [])], loader,
                   lambda batch: bn_input(batch).to(device, non_blocking=True))
    if not schedule_per_step:
        scheduler.step()
    names = sorted(sums)
    totals = all_sum([float(sums[n]) for n in names] + [count])
    return {n: v / totals[-1] for n, v in zip(names, totals)}, peak


@torch.no_grad()
def precise_bn(modules, loader, read):
    """Precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; pycls's PreciseBN): every BatchNorm of
    `modules` gets as running statistics the plain mean (torch.optim.swa_utils.update_bn) of its batch statistics
    over the batches `loader` yields, read with the weights as they are now; read(batch) -> the module's input.
    Momentum-0.1 running averages lag weights that move fast: at the lr peak of an 8-epoch run the evaluation
    saw statistics of older weights and validation accuracy fell by up to 0.08 (docs/research_notes.md, issue 28).
    Under torchrun each process estimates on its own batches, then the processes average. The RNG is untouched."""
    for module in modules:
        devices = [p.device for p in module.parameters() if p.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=devices):
            torch.optim.swa_utils.update_bn((read(batch) for batch in loader), module)
        stats = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for b in (m.running_mean, m.running_var)]
        if world_size() > 1 and stats:  # one reduction for all of them
            mean = torch.tensor(all_sum(torch.cat([s.flatten() for s in stats]).tolist())) / world_size()
            for s, part in zip(stats, mean.split([s.numel() for s in stats])):
                s.copy_(part.view_as(s))


def evaluate_run(model, ema, val=None, test=None):
    """Metrics of val(model) with the prefix val_ and test(model) unprefixed (None: skipped); with an EMA,
    the averaged weights under those names and the raw ones with raw_ added (val_raw_acc, raw_acc).
    DataError with one line for data a loader worker could not read."""
    weights = [("", ema.module), ("raw_", model)] if ema is not None else [("", model)]
    try:
        return {f"{split}{prefix}{k}": v for split, run in (("val_", val), ("", test)) if run is not None
                for prefix, evaluated in weights for k, v in run(evaluated).items()}
    except DataError as e:  # raised in a loader worker, it comes back with the worker's traceback
        raise DataError(_one_line(e)) from None


def compile_model(model):
    """torch.compile in place (nn.Module.compile: the state-dict keys stay as they are) of a flow model's
    backbone and heads, or of a whole bp model. Flow-map heads stay eager: their loss differentiates
    them by forward-mode AD (torch.func.jvp), which the compiled call does not go through."""
    maps = getattr(model, "objective", "velocity") == "flowmap"
    parts = ([model.backbone] + ([] if maps else list(model.heads))) if hasattr(model, "heads") else [model]
    for part in parts:
        part.compile()


def clip_and_step(optimizer, params, clip=1.0):
    """Gradient clipping at `clip` (paper D: 1.0), then the optimiser step. Returns the grad norm as a
    tensor (reading it would synchronise a GPU)."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else torch.tensor(0.0)
    optimizer.step()
    return norm


def make_ema(model, decay, buffers="avg"):
    """Weight EMA (AveragedModel) whose decay warms up: update n uses min(decay, (1 + n) / (10 + n)), so a
    short run is not evaluated on weights that still remember the init. buffers 'avg' averages the
    BatchNorm statistics like the weights; 'raw' keeps the trained model's."""
    @torch.no_grad()
    def ema_warmup(averaged, current, num_averaged):
        d = min(decay, (1.0 + float(num_averaged)) / (10.0 + float(num_averaged)))
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
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
