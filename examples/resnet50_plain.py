"""LRPET in a plain PyTorch training loop: torchvision's ResNet-50 on generated data (no download).

    python examples/resnet50_plain.py [--steps 8] [--interval 4] [--macs-cut 0.5] [--size 64] [--lr 0.001] [--out OUT]

The model trains at full shape; every ``--interval`` optimizer steps (and after the last one) the
selected convs are projected onto their planned ranks; at the end each becomes two thin convs, checked
against the projected dense model in float64, saved with its plan, and loaded into a freshly built
ResNet-50. The loop is the one of ``docs/pytorch.md``.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile

import torch
import torch.nn.functional as F
import torchvision

import lrpet_dense as lrpet


def batches(num_classes: int, size: int, batch: int, seed: int = 0):
    """Generated images whose class shifts the mean of one colour channel (learnable, no download)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        y = torch.randint(num_classes, (batch,), generator=g)
        x = torch.randn(batch, 3, size, size, generator=g)
        x[torch.arange(batch), y % 3] += 1.0 + y.float()[:, None, None] / num_classes
        yield x, y


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="optimizer steps")
    p.add_argument("--interval", type=int, default=4, help="project every N steps (and after the last)")
    p.add_argument("--macs-cut", type=float, default=0.5, help="fraction of the convs' MACs to remove")
    p.add_argument("--size", type=int, default=64, help="image size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.001, help="SGD learning rate")
    p.add_argument("--out", default=None, help="folder of the compressed checkpoint (default: a temporary one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)

    model = torchvision.models.resnet50(num_classes=args.classes)
    example = torch.randn(2, 3, args.size, args.size)
    config = lrpet.LRPETConfig(target_macs_cut=args.macs_cut, interval=args.interval)
    session = lrpet.prepare(model, example, config, total_steps=args.steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    data = batches(args.classes, args.size, args.batch)
    model.train()
    for step in range(args.steps):
        x, y = next(data)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        summary = session.step()  # projects every `interval` steps and after the last one
        print(f"step {step + 1}: loss {loss.item():.3f}" + (" (projected)" if summary else ""))

    model.eval()
    names = lrpet.compress_model_(model, session.plan, example)  # checked against the dense model in float64
    out = args.out or tempfile.mkdtemp(prefix="lrpet_resnet50_")
    path = os.path.join(out, "resnet50_lrpet.pth")
    lrpet.save_compressed(model, path)
    fresh = torchvision.models.resnet50(num_classes=args.classes)
    lrpet.load_compressed_(fresh, path)  # the factorised structure comes from the plan in the checkpoint
    with torch.no_grad():
        same = torch.allclose(fresh.eval()(example), model(example), rtol=1e-5, atol=1e-5)
    print(f"factorised {len(names)} convs; plan MAC cut {session.plan.reached_macs_cut:.1%}; wrote {path}; "
          f"reloaded model gives the same outputs: {same}")
    return {"factorized": names, "path": path, "plan": session.plan, "reloaded_same": same}


if __name__ == "__main__":
    main()
