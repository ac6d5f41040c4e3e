"""Supervised and unsupervised segmentation losses shared by base training, the SFT anchor and the
baselines. Pure functions / MONAI losses on ``logits (B, C, *spatial)`` and labels ``(B, *spatial)``.

Channel convention (:mod:`rndpo.models`): one logit channel → binary with a sigmoid; ``C ≥ 2`` → softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

__all__ = ["SupervisedLoss", "entropy_loss", "consistency_loss", "ema_update"]


class SupervisedLoss(torch.nn.Module):
    """MONAI DiceCE on integer label maps, for one-channel (sigmoid) or C-channel (softmax) logits.

    ``loss(logits (B, C, *spatial), labels (B, *spatial) int) -> scalar``. Binary: ``DiceCELoss(sigmoid=True)``
    on a float target ``(B, 1, *spatial)``; multi-class: ``DiceCELoss(softmax=True, to_onehot_y=True)``.
    Dice is computed per image (``batch=False``) and smoothed so empty masks give a finite loss.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels = num_channels
        if num_channels == 1:
            self.loss = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        else:
            self.loss = DiceCELoss(softmax=True, to_onehot_y=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.num_channels:
            raise ValueError(f"logits have {logits.shape[1]} channels, the loss was built for {self.num_channels}")
        if labels.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {(logits.shape[0], *logits.shape[2:])}")
        target = labels.unsqueeze(1)
        target = target.to(logits.dtype) if self.num_channels == 1 else target.long()
        return self.loss(logits, target)


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean per-pixel predictive entropy (nats) of ``logits (B, C, *spatial)``: entropy minimisation."""
    if logits.shape[1] == 1:
        z = logits[:, 0]
        p = torch.sigmoid(z)
        # H = −p log p − (1−p) log(1−p), written with logsigmoid for stability
        entropy = -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))
    else:
        log_probs = torch.log_softmax(logits, dim=1)
        entropy = -(log_probs.exp() * log_probs).sum(dim=1)
    return entropy.mean()


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the class probabilities (mean-teacher consistency); teacher is detached."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ in shape")
    return F.mse_loss(_probs(student_logits), _probs(teacher_logits.detach()))


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """``teacher ← decay · teacher + (1 − decay) · student`` for parameters; buffers are copied."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must be in (0, 1), got {decay}")
    for t_param, s_param in zip(teacher.parameters(), student.parameters()):
        t_param.mul_(decay).add_(s_param.detach(), alpha=1.0 - decay)
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        t_buf.copy_(s_buf)
