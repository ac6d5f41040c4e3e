"""torchrun + gloo on CPU: 2 processes give the same fine-tuning as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rndpo.bank import ProposalBank
from rndpo.config import FinetuneConfig, MiningConfig, ModelConfig, SyntheticConfig
from rndpo.data import make_synthetic
from rndpo.metrics import dice_per_case
from rndpo.mining import attach_reference, mine_pairs
from rndpo.models import build_model, logits_to_labels, predict_logits
from rndpo.training.finetune import FinetuneInputs, finetune

WORKER = Path(__file__).with_name("ddp_finetune_worker.py")
DICE_TOLERANCE = 2e-3  # a pixel or two of 16 × 32² test pixels may flip from summation-order differences
LOGIT_TOLERANCE = 2e-3
# Weights are not compared one by one: conv biases in front of instance norm have a zero true
# gradient, so Adam turns summation-order noise (~1e-10) into ±lr steps there, which the following
# norm cancels. The function the network computes is what must agree.


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = make_synthetic(SyntheticConfig(n_images=40, size=32, seed=5))
    pool = data.subset(range(24))
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(8, 16, 32), dropout=0.0), spatial_dims=2, in_channels=1, num_classes=2)
    base = logits_to_labels(predict_logits(model, pool.images)).numpy().astype(np.uint8)
    candidates = np.stack([pool.masks, base, np.zeros_like(base), np.ones_like(base)], axis=1)
    with ProposalBank.create(root / "bank", case_ids=pool.case_ids, spatial_shape=(32, 32), num_classes=2, k_max=4,
                             generators=["g"], dedupe=False) as writer:
        writer.add(np.arange(24), candidates, np.zeros((24, 4), dtype=np.int16))
    bank = ProposalBank.open(root / "bank")
    scores = np.stack([dice_per_case(candidates[:, k], pool.masks, 2) for k in range(4)], 1) + np.linspace(3e-6, 0, 4)
    pairs = attach_reference(mine_pairs(scores, bank, MiningConfig()), bank, model, pool.images)
    pairs.save(root / "pairs.npz")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "base.safetensors"))
    return root, data, pairs, bank


def single_process(world, cfg):
    root, data, pairs, bank = world
    pool, test = data.subset(range(24)), data.subset(range(24, 40))
    model = build_model(ModelConfig(channels=(8, 16, 32), dropout=0.0), spatial_dims=2, in_channels=1, num_classes=2)
    model.load_state_dict(load_file(str(root / "base.safetensors")))
    inputs = FinetuneInputs(pool_images=pool.images, bank=bank, pairs=pairs, targets=pool.masks)
    records = finetune(model, cfg, inputs, {"test": test}, root / f"single-{cfg.method}", eval_hd95=False)
    return records, model.state_dict()


def torchrun(world, cfg, nproc=2):
    root = world[0]
    (root / "cfg.json").write_text(cfg.model_dump_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
         str(root), cfg.method],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((root / f"ddp-{cfg.method}.json").read_text())
    assert out["world_size"] == nproc
    return out["records"], load_file(str(root / f"ddp-{cfg.method}.safetensors"))


@pytest.mark.parametrize("method", ["rn-dpo", "oracle"])
def test_two_processes_match_one_process(world, method):
    # 7 images per step: uneven shards (4 + 3 images, different pair counts) exercise the weighting
    cfg = FinetuneConfig(method=method, beta=1.0, lr=1e-3, steps=6, images_per_step=7, eval_every=3,
                         checkpoint_every=100)
    expected, expected_weights = single_process(world, cfg)
    records, weights = torchrun(world, cfg)
    assert [r["step"] for r in records] == [r["step"] for r in expected] == [0, 3, 6]
    for got, want in zip(records, expected):
        assert abs(got["test/dice"] - want["test/dice"]) <= DICE_TOLERANCE
    moved = max((expected_weights[k] - load_file(str(world[0] / "base.safetensors"))[k]).abs().max().item()
                for k in expected_weights)
    assert moved > 1e-3  # training did change the weights, so agreement is not trivial
    test = world[1].subset(range(24, 40))
    logits = []
    for state in (expected_weights, weights):
        model = build_model(ModelConfig(channels=(8, 16, 32), dropout=0.0), spatial_dims=2, in_channels=1, num_classes=2)
        model.load_state_dict(state)
        logits.append(predict_logits(model, test.images))
    torch.testing.assert_close(logits[1], logits[0], rtol=LOGIT_TOLERANCE, atol=LOGIT_TOLERANCE)


BASE_WORKER = Path(__file__).with_name("ddp_base_worker.py")


def test_base_training_two_processes_match_one_process(tmp_path):
    """Base training (augmented batches of 6 split 3 + 3) under torchrun equals one process."""
    from rndpo.training.checkpoint import load_model

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for nproc, out in ((1, tmp_path / "one"), (2, tmp_path / "two")):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={nproc}", str(BASE_WORKER), str(out)],
                                capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    data = make_synthetic(SyntheticConfig(n_images=40, size=32, seed=7)).subset(range(30, 40))
    one, _ = load_model(tmp_path / "one" / "last.safetensors")
    two, _ = load_model(tmp_path / "two" / "last.safetensors")
    torch.testing.assert_close(predict_logits(two, data.images), predict_logits(one, data.images),
                               rtol=LOGIT_TOLERANCE, atol=LOGIT_TOLERANCE)
    assert (tmp_path / "two" / "train_log.jsonl").read_text().count("\n") == 3  # rank 0 alone logs: epochs end at steps 5, 10, 12


def test_sharded_proposal_generation_reads_back_as_one_bank(tmp_path):
    """What each torchrun rank of `rndpo propose` does: its shard of the pool into shard_<rank>/."""
    from rndpo.config import ProposalConfig
    from rndpo.proposals import generate_proposals

    data = make_synthetic(SyntheticConfig(n_images=11, size=32, seed=2))
    torch.manual_seed(0)
    model = build_model(ModelConfig(channels=(8, 16), dropout=0.0), spatial_dims=2, in_channels=1, num_classes=2)
    cfg = ProposalConfig(mc_dropout=0, tta=("hflip",), thresholds=(0.45, 0.55), morphology=("dilate:1",))
    whole = generate_proposals(model, data.images, cfg, bank_path=tmp_path / "whole", case_ids=data.case_ids,
                               progress=False)
    for rank in range(3):
        generate_proposals(model, data.images, cfg, bank_path=tmp_path / "sharded", case_ids=data.case_ids,
                           progress=False, shard=(rank, 3))
    sharded = ProposalBank.open(tmp_path / "sharded")
    assert sharded.num_shards == 3 and sharded.case_ids == whole.case_ids
    for i in range(len(whole)):
        np.testing.assert_array_equal(sharded.masks(i), whole.masks(i))


def test_rndpo_run_under_torchrun_matches_one_process(tmp_path):
    """`rndpo run` launched by torchrun: rank 0 builds the stages alone (no deadlock with the other
    rank waiting on the stage lock), both ranks fine-tune each cell, results equal a 1-process run."""
    import csv

    import yaml

    from rndpo.demo import demo_config

    cfg = demo_config(quick=True).model_dump(mode="json")
    cfg["judges"] = ["oracle"]
    cfg["methods"] = ["base", {"method": "rn-dpo", "betas": [1.0]}]
    cfg["base"]["steps"] = 20
    cfg["model"]["dropout"] = 0.0
    cfg["proposals"]["mc_dropout"] = 0
    cfg["finetune"].update(steps=4, eval_every=2)
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"run{nproc}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "rndpo.cli", "--threads", "1", "run", str(config), "--out", str(out), "--no-report",
                   "--no-progress"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(out / "results.csv") as handle:
            results[nproc] = {row["method"]: row for row in csv.DictReader(handle)}
    assert set(results[2]) == {"base", "rn-dpo"}
    for method in ("base", "rn-dpo"):
        for key in ("peak", "final"):
            assert abs(float(results[2][method][key]) - float(results[1][method][key])) <= DICE_TOLERANCE
