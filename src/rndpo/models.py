"""Segmentation networks: a factory over MONAI networks, dropout control and batched inference.

Output convention (shared by the whole package, see :mod:`rndpo.objectives`):

- binary data (``num_classes == 2``): the network has **one** logit channel ``z`` (sigmoid);
  label = ``z > 0``; foreground probability = ``sigmoid(z)``.
- multi-class data (``num_classes = C >= 3``, background included): ``C`` logit channels (softmax);
  label = ``argmax``.

Architectures (``ModelConfig.arch``), 2D or 3D (``spatial_dims``); ``ModelConfig.channels`` gives the
features per resolution level, ``ModelConfig.dropout`` the dropout rate:

- ``unet``: :class:`monai.networks.nets.UNet`, strides 2 between levels, 2 residual units per level,
  instance norm; dropout after every convolution. Spatial sides must be divisible by
  ``2 ** (len(channels) - 1)``.
- ``basicunet``: :class:`monai.networks.nets.BasicUNet` (always 5 levels). ``channels`` of length 5
  are used as they are, of length 4 as ``(c0, c0, c1, c2, c3)`` (MONAI's own pattern, first level
  repeated); the last decoder level has ``c0`` features. Dropout after every convolution. Sides
  must be divisible by 16 and at least 32 (instance norm needs more than one pixel at the bottom).
- ``dynunet``: :class:`monai.networks.nets.DynUNet` (nnU-Net style), kernel 3, strides
  ``(1, 2, 2, ...)``, filters = ``channels``, no deep supervision; dropout after every convolution.
- ``segresnet``: :class:`monai.networks.nets.SegResNet`, ``init_filters = channels[0]`` (features
  double per level, so only ``channels[0]`` and ``len(channels)`` are used; ``channels[0]`` must be
  divisible by 8, the group-norm group count). MONAI applies dropout **once**, a channel dropout
  after the stem convolution, so MC-dropout samples from SegResNet vary less than from the others.

Every architecture above accepts a dropout rate, so MC-dropout works with all of them; with
``dropout == 0`` a model has no dropout modules and :func:`set_dropout` is a no-op (check with
:func:`has_dropout` before sampling).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from rndpo.config import ModelConfig

__all__ = [
    "ARCHITECTURES",
    "build_model",
    "out_channels_for",
    "dropout_modules",
    "has_dropout",
    "set_dropout",
    "logits_to_labels",
    "logits_to_probs",
    "predict_logits",
    "required_divisor",
    "check_input_size",
    "count_parameters",
]

ARCHITECTURES: tuple[str, ...] = ("unet", "basicunet", "dynunet", "segresnet")


def out_channels_for(num_classes: int) -> int:
    """Logit channels for ``num_classes`` classes (background included): 1 if binary, else ``num_classes``."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background included), got {num_classes}")
    return 1 if num_classes == 2 else num_classes


def required_divisor(cfg: ModelConfig) -> int:
    """Each spatial side of the input must be a multiple of this number for ``cfg``'s network."""
    if cfg.arch == "basicunet":
        return 16
    return 2 ** (len(cfg.channels) - 1)


def build_model(cfg: ModelConfig, *, spatial_dims: int, in_channels: int, num_classes: int) -> nn.Module:
    """Build the segmentation network described by ``cfg``.

    Args:
        cfg: architecture, channels per level and dropout rate.
        spatial_dims: 2 (images) or 3 (volumes).
        in_channels: image channels ``C_in``.
        num_classes: classes including background; 2 → one sigmoid logit channel, ``C >= 3`` → ``C``
            softmax channels.

    Returns:
        A freshly initialised ``nn.Module`` mapping ``(B, C_in, *spatial)`` to logits
        ``(B, out_channels_for(num_classes), *spatial)``.

    Raises:
        ValueError: for an unknown architecture, ``spatial_dims`` not in {2, 3}, ``in_channels < 1``,
            ``num_classes < 2`` or channels the architecture cannot use (named in the message).
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    out_channels = out_channels_for(num_classes)
    channels = tuple(int(c) for c in cfg.channels)
    if len(channels) < 2:
        raise ValueError(f"ModelConfig.channels needs at least 2 levels, got {channels}")
    from monai.networks import nets

    if cfg.arch == "unet":
        return nets.UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=2,
            norm="INSTANCE",
            dropout=cfg.dropout,
        )
    if cfg.arch == "basicunet":
        if len(channels) == 5:
            features = (*channels, channels[0])
        elif len(channels) == 4:
            features = (channels[0], channels[0], channels[1], channels[2], channels[3], channels[0])
        else:
            raise ValueError(f"basicunet has 5 levels: ModelConfig.channels must have 4 or 5 entries, got {channels}")
        return nets.BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=features,
            dropout=cfg.dropout,
        )
    if cfg.arch == "dynunet":
        levels = len(channels)
        strides = [1] + [2] * (levels - 1)
        return nets.DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[3] * levels,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=channels,
            dropout=cfg.dropout if cfg.dropout > 0 else None,
            deep_supervision=False,
        )
    if cfg.arch == "segresnet":
        if channels[0] % 8:
            raise ValueError(f"segresnet uses group norm with 8 groups: channels[0] must be divisible by 8, got {channels[0]}")
        levels = len(channels)
        blocks_down = tuple((1, 2, 2, 4)[i] if i < 4 else 4 for i in range(levels))
        return nets.SegResNet(
            spatial_dims=spatial_dims,
            init_filters=channels[0],
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=cfg.dropout if cfg.dropout > 0 else None,
            blocks_down=blocks_down,
            blocks_up=(1,) * (levels - 1),
        )
    raise ValueError(f"unknown arch {cfg.arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def dropout_modules(model: nn.Module) -> list[nn.Module]:
    """The dropout modules of ``model`` (``nn.Dropout``, ``Dropout2d``, ``Dropout3d``, ``AlphaDropout``...)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


def has_dropout(model: nn.Module) -> bool:
    """True when ``model`` has at least one dropout module with a non-zero rate (MC-dropout possible)."""
    return bool(dropout_modules(model))


def set_dropout(model: nn.Module, enabled: bool) -> None:
    """Switch only the dropout modules of ``model`` to train (``enabled``) or eval mode.

    Every other module keeps its mode, so after ``model.eval(); set_dropout(model, True)`` the norms
    use their inference behaviour while dropout samples (MC-dropout). :func:`predict_logits` does
    this for you with ``dropout=True``.
    """
    for module in dropout_modules(model):
        module.train(enabled)


def logits_to_labels(logits: torch.Tensor) -> torch.Tensor:
    """Label map from logits.

    Args:
        logits: ``(B, C, *spatial)``; ``C == 1`` binary (label = ``z > 0``), ``C >= 2`` argmax.

    Returns:
        ``(B, *spatial)`` int64.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def logits_to_probs(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from logits, same shape ``(B, C, *spatial)``.

    ``C == 1``: the foreground probability ``sigmoid(z)`` (one channel); ``C >= 2``: softmax over channels.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be (B, C, *spatial), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def predict_logits(
    model: nn.Module,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 32,
    *,
    dropout: bool = False,
) -> torch.Tensor:
    """Logits of ``model`` for ``images``, in batches, without gradients.

    The model runs in eval mode (norms use inference behaviour); with ``dropout=True`` the dropout
    modules sample (one MC-dropout draw per call; seed with ``torch.manual_seed`` for repeatable
    draws). The modes of all modules are restored afterwards, so calling this in the middle of
    training leaves the model as it was.

    Args:
        model: a network from :func:`build_model` (any device; inputs are moved to it).
        images: ``(N, C_in, *spatial)`` float array or tensor.
        batch_size: images per forward pass.
        dropout: keep dropout active (MC-dropout).

    Returns:
        ``(N, C, *spatial)`` float32 tensor on the CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim < 4:
        raise ValueError(f"images must be (N, C_in, *spatial), got shape {tuple(images.shape)}")
    device = _model_device(model)
    modes = {module: module.training for module in model.modules()}
    outputs: list[torch.Tensor] = []
    try:
        model.eval()
        if dropout:
            set_dropout(model, True)
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
                logits = model(batch)
                outputs.append(_as_plain_tensor(logits).float().cpu())
    finally:
        for module, training in modes.items():
            module.training = training
    if not outputs:
        return torch.zeros((0,), dtype=torch.float32)
    return torch.cat(outputs, dim=0)


def _as_plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Strip MONAI's MetaTensor wrapper (when a transform produced one) to a plain tensor."""
    as_tensor = getattr(tensor, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else tensor


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_input_size(cfg: ModelConfig, spatial_shape: Sequence[int]) -> None:
    """Raise ValueError when a side of ``spatial_shape`` is not a multiple of :func:`required_divisor`."""
    divisor = required_divisor(cfg)
    bad = [int(s) for s in spatial_shape if int(s) % divisor]
    if bad:
        raise ValueError(
            f"arch {cfg.arch!r} with {len(cfg.channels)} levels needs spatial sides divisible by {divisor}, "
            f"got {tuple(int(s) for s in spatial_shape)}"
        )
