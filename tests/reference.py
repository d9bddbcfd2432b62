"""Helpers shared by the tests: a central finite-difference gradient for the float64 loop references, and a
tiny backbone for building the LightningModule without data."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def finite_difference_gradient(reference, tensor, step=1e-6):
    """Central differences of the scalar ``reference(tensor)`` w.r.t. every element of ``tensor``."""
    gradient = torch.zeros_like(tensor)
    for index in range(tensor.numel()):
        plus, minus = tensor.clone(), tensor.clone()
        plus.view(-1)[index] += step
        minus.view(-1)[index] -= step
        gradient.view(-1)[index] = (reference(plus) - reference(minus)) / (2 * step)
    return gradient


class TinyBackbone(nn.Module):
    """Flattened ``[B, 3, 2, 2]`` images → 6 features."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(12, 6)
        self.feature_dim = 6

    def forward(self, x):
        return self.linear(x.flatten(1))


class Batches(L.LightningDataModule):
    """A datamodule serving fixed tensors in batches of 4, for tests that drive the training module directly."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        self.images, self.labels = images, labels

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=4)
