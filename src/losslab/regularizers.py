"""Terms added to any classification loss: ``regularizer=<name>`` or ``regularizer=[<name>,<name>]``.

Each choice is one YAML in ``configs/regularizer/`` whose single top-level key names it
(``palm_zloss: {_target_: ...}``), so several can be selected at once and each is overridden as
``regularizer.<name>.<hyperparameter>=...``. The training module adds every selected term to the loss and
logs each as ``<stage>/reg/<name>``; an embedding loss has no logits and is refused at start-up.
"""

from __future__ import annotations

import torch
from torch import nn

from losslab.errors import ConfigError
from losslab.losses.classification import palm_z_loss


class Regularizer(nn.Module):
    """``forward(logits [N, C], target [N] long or [N, C] probabilities) -> scalar``, already weighted:
    the training module adds it to the loss as it is."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PaLMZLossRegularizer(Regularizer):
    """PaLM's z-loss (Chowdhery et al. 2022, section 5), ``coefficient * log^2 Z`` with Z the softmax
    normaliser: :func:`losslab.losses.classification.palm_z_loss`. Not the spherical Z-loss of
    de Brebisson & Vincent 2016 (``loss=zloss_spherical``)."""

    def __init__(self, coefficient: float = 1e-4) -> None:
        super().__init__()
        if coefficient < 0:
            raise ConfigError(f"regularizer.palm_zloss.coefficient={coefficient}: must be >= 0")
        self.coefficient = coefficient

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return palm_z_loss(logits, self.coefficient)
