"""Issue 18: per-sample training noise for a batch of 512 at d = 512, the device path (core.table_normal,
one gather) against the per-sample host generator loop it replaces on CUDA (the loop's draws are copied
to the device, as train_noise did there), both in one run, median of 21 calls each, three rounds, one
CPU thread. `python docs/bench_noise.py [--device cuda]` (default: cuda when present). Measured numbers:
docs/research_notes.md."""
import argparse
import os
import sys
import time

import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import core  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
device = torch.device(parser.parse_args().device)
torch.set_num_threads(1)
idx = torch.randperm(50000)[:512]  # on the host, as the loader hands dataset indices to train_noise
fns = {"host loop (old train_noise)": lambda key: core.train_noise(idx, key, (512,), device, kind="host"),
       "device table (new)": lambda key: core.train_noise(idx, key, (512,), device, kind="device"),
       "torch.randn(512, 513), not per sample": lambda key: torch.randn(512, 513, device=device)}


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)


for fn in fns.values():
    fn((0, 0, 0, 0))  # the table is made on the first call
print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
for rnd in range(3):
    median = {}
    for name, fn in fns.items():
        times = []
        for r in range(21):
            sync()
            t0 = time.perf_counter()
            fn((0, rnd, r, 1))
            sync()
            times.append(time.perf_counter() - t0)
        median[name] = sorted(times)[10]
    base = median["host loop (old train_noise)"]
    print(f"round {rnd}: " + ", ".join(f"{n} {t * 1e3:.3f} ms ({base / t:.1f}x)" for n, t in median.items()))
