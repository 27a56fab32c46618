"""Backward through torch.func.jvp of a normalisation layer: which ones torch differentiates correctly.

For anyone who trains on Jacobian-vector products (MeanFlow, SGFlow and other flow-map or consistency
objectives, Hessian-free methods): the loss ||J_f dx||^2 of f(x) = tanh(norm(x W)) is differentiated
with respect to W by autograd through torch.func.jvp and by a central difference in float64. In torch
2.14.1 layer_norm, training-mode batch_norm and instance_norm disagree (their fused kernels' saved
mean and rstd are treated as constants: pytorch/pytorch#196700, #196699); group_norm and rms_norm agree,
as does layer_norm written from primitive ops (DFM's core.exact_layer_norm, used inside core.ExactNorms).
Values agree in every case: only gradients are wrong, so a test of values alone cannot see it.

    python docs/jvp_norm_bug.py
"""
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")  # torch.func loads decompositions


def primitive_layer_norm(h, eps=1e-5):
    centred = h - h.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


NORMS = {
    "layer_norm": lambda h: F.layer_norm(h, h.shape[-1:]),
    "batch_norm (training)": lambda h: F.batch_norm(h, None, None, training=True),
    "instance_norm": lambda h: F.instance_norm(h),
    "group_norm": lambda h: F.group_norm(h, 2),
    "rms_norm": lambda h: F.rms_norm(h, h.shape[-1:]),
    "layer_norm from primitives": primitive_layer_norm,
}


def main():
    torch.manual_seed(0)
    x, dx = torch.randn(6, 4, 5, dtype=torch.float64), torch.randn(6, 4, 5, dtype=torch.float64)
    w, direction = torch.randn(4, 4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    print(f"torch {torch.__version__}: d/dW ||J_f dx||^2 along a random direction, autograd vs central difference")
    for name, norm in NORMS.items():
        def loss(w):
            f = lambda xx: torch.tanh(norm(torch.einsum("ij,bjk->bik", w, xx)))  # noqa: E731
            return torch.func.jvp(f, (x,), (dx,))[1].pow(2).sum()
        w_leaf = w.clone().requires_grad_(True)
        autograd = (torch.autograd.grad(loss(w_leaf), w_leaf)[0] * direction).sum().item()
        with torch.no_grad():
            difference = ((loss(w + 1e-6 * direction) - loss(w - 1e-6 * direction)) / 2e-6).item()
        ok = abs(autograd - difference) <= 1e-6 * max(1.0, abs(difference))
        print(f"  {name:28s} autograd {autograd:12.6f}  difference {difference:12.6f}  {'ok' if ok else 'WRONG'}")


if __name__ == "__main__":
    main()
