"""Checkpoints, resumable state, base training and the train-base / evaluate commands."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rndpo.config import ModelConfig
from rndpo.errors import CheckpointError
from rndpo.models import build_model, predict_logits
from rndpo.training.checkpoint import load_model, load_weights, model_meta, save_model
from rndpo.training.loop import (
    cosine_schedule,
    derive_seed,
    load_state,
    load_training_state,
    make_optimizer,
    rewind_jsonl,
    rng_state,
    save_state,
    save_training_state,
    seed_everything,
    set_rng_state,
)

TINY = ModelConfig(channels=(8, 16, 32), dropout=0.1)


class _Data:
    """A minimal SegDataset stand-in for the checkpoint tests."""

    def __init__(self, n: int = 2, size: int = 32, num_classes: int = 2) -> None:
        rng = np.random.default_rng(0)
        self.images = rng.normal(size=(n, 1, size, size)).astype(np.float32)
        self.masks = (rng.random((n, size, size)) > 0.5).astype(np.uint8)
        self.case_ids = [f"c{i}" for i in range(n)]
        self.num_classes = num_classes
        self.spatial_dims = 2
        self.meta = {"normalisation": "zscore", "source": "test"}


# ------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("num_classes", [2, 3])
def test_model_checkpoint_round_trip_gives_identical_logits(tmp_path, num_classes):
    torch.manual_seed(0)
    data = _Data(num_classes=num_classes)
    model = build_model(TINY, spatial_dims=2, in_channels=1, num_classes=num_classes)
    path = save_model(tmp_path / "m.safetensors", model, model_meta(TINY, data, step=7))
    loaded, meta = load_model(path)
    assert meta["arch"] == "unet" and meta["size"] == 32 and meta["step"] == 7
    assert meta["normalisation"] == "zscore" and meta["num_classes"] == num_classes
    assert torch.equal(predict_logits(model, data.images), predict_logits(loaded, data.images))
    other = build_model(TINY, spatial_dims=2, in_channels=1, num_classes=num_classes)
    load_weights(other, path)
    assert torch.equal(predict_logits(other, data.images), predict_logits(model, data.images))


def test_corrupted_model_checkpoint_raises_naming_the_file(tmp_path):
    model = build_model(TINY, spatial_dims=2, in_channels=1, num_classes=2)
    path = save_model(tmp_path / "m.safetensors", model, model_meta(TINY, _Data()))
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load_model(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="no best.safetensors"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        save_model(tmp_path / "x.safetensors", model, {"arch": "unet"})


# --------------------------------------------------------------------------------- full state
def test_state_round_trip_of_nested_values(tmp_path):
    state = {
        "tensor": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "array": np.arange(4, dtype=np.uint32),
        "tuple": (1, 2.5, "x", None, True),
        "int_keys": {0: torch.ones(2), 3: {"a": float("inf")}},
        "list": [1, [2, 3]],
        "nan": float("nan"),
    }
    save_state(tmp_path / "s.safetensors", state)
    loaded = load_state(tmp_path / "s.safetensors")
    assert torch.equal(loaded["tensor"], state["tensor"])
    assert loaded["array"].dtype == np.uint32 and loaded["array"].tolist() == [0, 1, 2, 3]
    assert loaded["tuple"] == (1, 2.5, "x", None, True)
    assert torch.equal(loaded["int_keys"][0], torch.ones(2)) and loaded["int_keys"][3]["a"] == math.inf
    assert loaded["list"] == [1, [2, 3]] and math.isnan(loaded["nan"])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupted_state_raises_checkpoint_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "state.safetensors"
    save_state(path, {"w": torch.randn(64)})
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) - 10]
    elif damage == "flip":
        blob[-3] ^= 0xFF  # inside the tensor data: only the checksum notices
    else:
        blob = bytearray(b"not a checkpoint")
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="state.safetensors"):
        load_state(path)


def test_training_state_restores_model_optimizer_schedule_and_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = make_optimizer(model, 1e-2, 1e-4)
    scheduler = cosine_schedule(optimizer, total_steps=10, warmup_steps=2)
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    save_training_state(tmp_path / "s.safetensors", model=model, optimizer=optimizer, scheduler=scheduler, step=3, extra={"history": [{"step": 3, "v": None}]})
    expected_next = (torch.rand(3), np.random.rand(), random.random())

    other = torch.nn.Linear(3, 1)
    other_opt = make_optimizer(other, 1e-2, 1e-4)
    other_sched = cosine_schedule(other_opt, total_steps=10, warmup_steps=2)
    step, extra = load_training_state(tmp_path / "s.safetensors", model=other, optimizer=other_opt, scheduler=other_sched)
    assert step == 3 and extra == {"history": [{"step": 3, "v": None}]}
    assert torch.equal(other.weight, model.weight)
    assert other_sched.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    got_next = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(got_next[0], expected_next[0]) and got_next[1:] == expected_next[1:]
    with pytest.raises(CheckpointError, match="does not fit"):
        load_training_state(tmp_path / "s.safetensors", model=torch.nn.Linear(4, 1))


def test_seeding_helpers(tmp_path):
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed(123456789, 10**12) < 2**31
    seed_everything(5)
    state = rng_state()
    first = torch.rand(2)
    set_rng_state(state)
    assert torch.equal(torch.rand(2), first)
    lrs = []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = cosine_schedule(optimizer, total_steps=4, warmup_steps=0)
    for _ in range(4):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 10, 15)))
    rewind_jsonl(log, 10)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [5, 10]
