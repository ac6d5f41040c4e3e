"""Worker of tests/test_distributed.py, launched with ``torchrun --standalone --nproc_per_node=N``.

Reads the world the test saved (model weights, bank, pairs), fine-tunes with DDP and, on rank 0,
writes the evaluation records and the final weights next to it.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rndpo.bank import ProposalBank
from rndpo.config import FinetuneConfig, ModelConfig, SyntheticConfig
from rndpo.data import make_synthetic
from rndpo.mining import Pairs
from rndpo.models import build_model
from rndpo.training import distributed
from rndpo.training.finetune import FinetuneInputs, finetune

torch.set_num_threads(1)
root = Path(sys.argv[1])
method = sys.argv[2]
info = distributed.init()
data = make_synthetic(SyntheticConfig(n_images=40, size=32, seed=5))
pool, test = data.subset(range(24)), data.subset(range(24, 40))
model = build_model(ModelConfig(channels=(8, 16, 32), dropout=0.0), spatial_dims=2, in_channels=1, num_classes=2)
model.load_state_dict(load_file(str(root / "base.safetensors")))
cfg = FinetuneConfig.model_validate(json.loads((root / "cfg.json").read_text()))
inputs = FinetuneInputs(pool_images=pool.images, bank=ProposalBank.open(root / "bank"), pairs=Pairs.load(root / "pairs.npz"),
                        targets=pool.masks)
records = finetune(model, cfg, inputs, {"test": test}, root / f"ddp-{method}", eval_hd95=False)
if info.rank == 0:
    (root / f"ddp-{method}.json").write_text(json.dumps({"world_size": info.world_size, "records": records}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / f"ddp-{method}.safetensors"))
