"""Train networks of examples/digits_net.py with a plain PyTorch loop and save checkpoints the way
training scripts usually do: the model wrapped in ``nn.DataParallel`` (so every name starts with
``module.``) and the weights under a ``"state_dict"`` key beside the epoch and the optimizer.

    python examples/train_plain.py --out checkpoints --sources 5 --heldout 3

writes ``checkpoints/sources/net-<seed>.pt`` and ``checkpoints/heldout/net-<seed>.pt``, which
``python -m starfast.train --sources-from 'checkpoints/sources/*.pt' --heldout-from
checkpoints/heldout`` imports. The data is starfast's digits (``starfast.data.load``), so the
inputs are normalised exactly as starfast evaluates them.
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from digits_net import make_net
from starfast import data


def train(seed: int, digits, epochs: int, channels: int):
    torch.manual_seed(seed)
    model = nn.DataParallel(make_net(num_classes=digits.num_classes, in_channels=digits.in_channels, channels=channels))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    inputs, labels = digits.tensors("train")
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(labels)).split(32):
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sources", type=int, default=5)
    parser.add_argument("--heldout", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()
    digits = data.load("digits")
    test_inputs, test_labels = digits.tensors("test")
    seeds = {"sources": range(args.sources), "heldout": range(100, 100 + args.heldout)}
    for role, role_seeds in seeds.items():
        (args.out / role).mkdir(parents=True, exist_ok=True)
        for seed in role_seeds:
            model, optimizer = train(seed, digits, args.epochs, args.channels)
            path = args.out / role / f"net-{seed}.pt"
            torch.save({"epoch": args.epochs, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
            with torch.no_grad():
                accuracy = (model.eval()(test_inputs).argmax(-1) == test_labels).float().mean().item()
            print(f"{path}: test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
