"""The blob world shared by the recipe and streaming tests: tiny MLPs fine-tuned from one shared
init on 2-D Gaussian blobs (fast, CPU only)."""

import torch
import torch.nn.functional as F
from torch import nn


def blobs(n, seed):
    """Three overlapping Gaussian classes in 2-D: accuracies well below 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centres = torch.tensor([[0.0, 1.0], [1.0, -0.5], [-1.0, -0.5]])
    return centres[y] + 0.7 * torch.randn(n, 2, generator=g), y


def make_model():
    torch.manual_seed(0)  # the shared "pretrained" init every ingredient starts from
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))


def finetune(init, x, y, lr, seed, steps=60):
    model = make_model()
    model.load_state_dict(init)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        idx = torch.randint(len(y), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
