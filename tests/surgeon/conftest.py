"""Shared captures: each demo model is captured once per test session (a few seconds each)."""

import pytest
import torch


class TinyCNN(torch.nn.Module):
    """A plain (non-Hugging Face) model: two convolutions, a norm and a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3)
        self.norm = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.norm(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN().eval(), (torch.randn(2, 3, 16, 16),)


@pytest.fixture(scope="session")
def captures():
    from surgeon.api import capture_model

    cache = {}

    def get(name):
        if name not in cache:
            if name == "cnn":
                model, inputs = tiny_cnn()
                cache[name] = capture_model(model, example_inputs=inputs)
            else:
                cache[name] = capture_model(f"demo:{name}", weights=True)
        return cache[name]

    return get
