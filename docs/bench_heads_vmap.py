"""Issue 18: ensemble inference of T residual-MLP heads, one after another against torch.func.vmap over their
stacked parameters (`python docs/bench_heads_vmap.py`, one thread). Measured numbers: docs/research_notes.md."""
import copy
import os
import sys
import time

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import core  # noqa: E402
from torch.func import stack_module_state, functional_call
torch.manual_seed(0)
for T, feat, d, hidden, bs in ((3, 1536, 512, 1024, 256), (8, 1536, 512, 1024, 256), (3, 128, 64, 256, 512)):
    heads = [core.MLPFlowHead(feat, d, hidden, 2, 0.1).eval() for _ in range(T)]
    f, z0 = torch.randn(bs, feat), torch.randn(bs, d)
    t = torch.zeros(bs)
    params, buffers = stack_module_state(heads)
    base = copy.deepcopy(heads[0]).to('meta')
    def one(p, b, z, f, t):
        return functional_call(base, (p, b), (z, f, t))
    batched = torch.vmap(one, in_dims=(0, 0, None, None, None))
    def seq():
        with torch.no_grad():
            return torch.stack([z0 + h(z0, f, t) for h in heads])
    def vm():
        with torch.no_grad():
            return z0 + batched(params, buffers, z0, f, t)
    torch.testing.assert_close(seq(), vm(), rtol=1e-4, atol=1e-4)
    def tm(fn, r=7):
        fn(); ts = []
        for _ in range(r):
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        return sorted(ts)[r // 2] * 1e3
    print(f'T={T} feat={feat} d={d} bs={bs}: sequential {tm(seq):.1f} ms, vmap {tm(vm):.1f} ms')
