"""Issue 18: per-sample noise on the device (core.counter_normal) against the per-sample host generator loop
(`python docs/bench_noise.py`, one thread). Measured numbers: docs/research_notes.md."""
import os
import sys
import time

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import core  # noqa: E402


def dev(i, k, s):
    return core.train_noise(i, k, s, kind='device')


def train_noise_loop(indices, key, shape):  # the per-sample host generator (the CPU default)
    return core.train_noise(indices, key, shape, kind="host")


idx = torch.randperm(50000)[:512]
for fn in (train_noise_loop, dev):
    fn(idx, (0, 0, 0, 0), (512,))
times = {}
for fn in (train_noise_loop, dev):
    t = []
    for r in range(5):
        t0 = time.perf_counter(); fn(idx, (0, r, 0, 1), (512,)); t.append(time.perf_counter() - t0)
    times[fn.__name__] = sorted(t)[2]
print(times, 'speed-up', times['train_noise_loop'] / times['dev'])
# statistics over many samples: adjacent indices uncorrelated
z, _ = dev(torch.arange(4096), (1, 2, 3), (64,))
c = torch.corrcoef(z)
off = c[~torch.eye(len(c), dtype=bool)]
print('max |corr| between samples', off.abs().max().item(), 'expected ~', 4.5 / 64 ** 0.5)
print('adjacent-index corr mean', torch.diagonal(c, 1).mean().item())
zk, _ = dev(torch.arange(4096), (1, 2, 4), (64,))
print('corr across keys', torch.corrcoef(torch.stack([z.flatten(), zk.flatten()]))[0, 1].item())
