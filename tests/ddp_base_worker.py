"""Worker of tests/test_distributed.py: base training under ``torchrun --standalone --nproc_per_node=N``."""

import sys
from pathlib import Path

import torch

from rndpo.config import BaseTrainConfig, ModelConfig, SyntheticConfig
from rndpo.data import make_synthetic
from rndpo.training import distributed
from rndpo.training.base import train_base

torch.set_num_threads(1)
out = Path(sys.argv[1])
data = make_synthetic(SyntheticConfig(n_images=40, size=32, seed=7))
train_base(data.subset(range(30)), data.subset(range(30, 40)), ModelConfig(channels=(8, 16, 32), dropout=0.0),
           BaseTrainConfig(steps=12, batch_size=6, lr=3e-3, checkpoint_every=100, seed=1), out, progress=False,
           dist_info=distributed.init())
