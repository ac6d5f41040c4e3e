"""Network factory, dropout control and inference helpers (rndpo.models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rndpo.config import ModelConfig
from rndpo.models import (
    ARCHITECTURES,
    build_model,
    check_input_size,
    dropout_modules,
    has_dropout,
    logits_to_labels,
    logits_to_probs,
    out_channels_for,
    predict_logits,
    set_dropout,
)

SMALL = (8, 16, 16, 32)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("spatial_dims, num_classes", [(2, 2), (2, 4), (3, 2), (3, 3)])
def test_every_arch_builds_with_right_output_shape(arch, spatial_dims, num_classes):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, channels=SMALL), spatial_dims=spatial_dims, in_channels=2, num_classes=num_classes)
    side = 32 if spatial_dims == 2 or arch == "basicunet" else 16  # basicunet: 4 halvings, ≥ 2 px at the bottom
    images = torch.randn(2, 2, *([side] * spatial_dims))
    logits = predict_logits(model, images, batch_size=1)
    assert logits.shape == (2, out_channels_for(num_classes), *([side] * spatial_dims))
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert has_dropout(model)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_set_dropout_changes_passes_only_when_enabled(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, channels=SMALL, dropout=0.3), spatial_dims=2, in_channels=1, num_classes=2)
    images = torch.randn(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
        set_dropout(model, True)
        assert all(m.training for m in dropout_modules(model))
        norms = [m for m in model.modules() if "Norm" in type(m).__name__]
        assert norms and not any(m.training for m in norms)  # norms stay in eval
        assert not torch.equal(model(images), model(images))
        set_dropout(model, False)
        assert torch.equal(model(images), model(images))
    # predict_logits: dropout only on request, and modes restored afterwards
    model.train()
    first, second = predict_logits(model, images), predict_logits(model, images)
    assert torch.equal(first, second)
    assert model.training and all(m.training for m in model.modules())
    torch.manual_seed(1)
    mc_a = predict_logits(model, images, dropout=True)
    torch.manual_seed(1)
    mc_b = predict_logits(model, images, dropout=True)
    assert torch.equal(mc_a, mc_b) and not torch.equal(mc_a, first)


def test_zero_dropout_has_no_dropout_modules():
    model = build_model(ModelConfig(arch="unet", channels=SMALL, dropout=0.0), spatial_dims=2, in_channels=1, num_classes=2)
    assert not has_dropout(model)
    images = torch.randn(1, 1, 32, 32)
    assert torch.equal(predict_logits(model, images, dropout=True), predict_logits(model, images))


def test_logits_to_labels_and_probs():
    binary = torch.tensor([[[[-1.0, 0.0, 2.0]]]])  # (1, 1, 1, 3)
    assert logits_to_labels(binary).tolist() == [[[0, 0, 1]]]
    assert logits_to_labels(binary).dtype == torch.int64
    assert torch.allclose(logits_to_probs(binary), torch.sigmoid(binary))
    multi = torch.tensor([[[[1.0, 0.0]], [[3.0, -1.0]], [[0.0, 5.0]]]])  # (1, 3, 1, 2)
    assert logits_to_labels(multi).tolist() == [[[1, 2]]]
    assert torch.allclose(logits_to_probs(multi).sum(dim=1), torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="logits"):
        logits_to_labels(torch.zeros(3, 4))


def test_predict_logits_accepts_numpy_and_batches_consistently():
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=SMALL), spatial_dims=2, in_channels=1, num_classes=3)
    images = np.random.default_rng(0).normal(size=(5, 1, 32, 32)).astype(np.float32)
    whole = predict_logits(model, images, batch_size=5)
    pieces = predict_logits(model, images, batch_size=2)
    assert torch.allclose(whole, pieces, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        predict_logits(model, images, batch_size=0)


def test_build_model_validation():
    with pytest.raises(ValueError, match="spatial_dims"):
        build_model(ModelConfig(), spatial_dims=1, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        build_model(ModelConfig(), spatial_dims=2, in_channels=1, num_classes=1)
    with pytest.raises(ValueError, match="divisible by 8"):
        build_model(ModelConfig(arch="segresnet", channels=(12, 24)), spatial_dims=2, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="4 or 5"):
        build_model(ModelConfig(arch="basicunet", channels=(8, 16)), spatial_dims=2, in_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        check_input_size(ModelConfig(channels=(8, 16, 32, 64)), (60, 64))
    check_input_size(ModelConfig(channels=(8, 16, 32, 64)), (64, 64))
