"""Does the semigroup hold for trained flow maps? Validation-split diagnostics of flow-map checkpoints (issue 26).

    python docs/semigroup_check.py runs/cnn_fm.pt [more.pt ...]

For head 0 (span global) and the z0 draw 0 of each validation image, with z1_hat = f(0, 1, z0) and
scale = ||z1_hat - z0||: the two-jump defect ||f(s, 1, f(0, s, z0)) - z1_hat|| / scale, and how far the
intermediate point f(0, s, z0) lies from the straight line (1 - s) z0 + s z1_hat, for s = 1/8, 1/2, 7/8;
the one-step endpoint's distance to the class target W_embed[y] and its norm against the target's; and the
validation accuracy of 1, 2, 4, 8 composed jumps (core.compose). Exact maps have defect 0.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import analyze  # noqa: E402
import core  # noqa: E402


@torch.no_grad()
def diagnose(path):
    run = analyze.Run(path, torch.device("cpu"))
    model, sums, n = run.model, {}, 0
    if getattr(model, "objective", "velocity") != "flowmap" or model.span != "global":
        raise SystemExit(f"error: {path} is not a flow-map run with --span global")

    def add(key, values):
        sums[key] = sums.get(key, 0.0) + float(values.sum())
    for x, y, idx in run.loader(run.module.build_data(run.args)[1], 512):  # the validation split
        feats, z0 = model.backbone(x), core.noise_for(idx, (model.dim,), 0, "cpu")
        zero, one = torch.zeros(len(y)), torch.ones(len(y))
        end = model.flow_map(0, z0, feats, zero, one)
        scale = (end - z0).norm(dim=1)
        for s in (0.125, 0.5, 0.875):
            middle = model.flow_map(0, z0, feats, zero, one * s)
            add(f"defect_s{s}", (model.flow_map(0, middle, feats, one * s, one) - end).norm(dim=1) / scale)
            add(f"off_line_s{s}", (middle - ((1 - s) * z0 + s * end)).norm(dim=1) / scale)
        target = model.embed(y)
        add("to_target", (end - target).norm(dim=1) / scale)
        add("norm_ratio", end.norm(dim=1) / target.norm(dim=1))
        for steps in core.MAP_STEPS:
            mapping = lambda k, z, t, u: model.flow_map(k, z, feats, t, u)  # noqa: E731
            add(f"val_acc_steps_{steps}", model.logits(core.compose(mapping, z0, model.T, steps)).argmax(1) == y)
        n += len(y)
    print(path, " ".join(f"{k} {v / n:.4f}" for k, v in sums.items()))


if __name__ == "__main__":
    torch.set_num_threads(1)
    for checkpoint in sys.argv[1:]:
        diagnose(checkpoint)
