"""The practitioner's library path, with a plain torch model (not MONAI) and the README's example."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import rndpo.api as rn
from rndpo.config import SyntheticConfig
from rndpo.data import make_synthetic
from rndpo.errors import RndpoError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs(tmp_path, monkeypatch):
    """The README's library example is executed as written (so the README stays true)."""
    text = README.read_text()
    match = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lacks the library example block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), namespace)
    pairs, records = namespace["pairs"], namespace["records"]
    assert len(pairs) > 0 and pairs.has_reference
    assert records[-1]["step"] == 20
    assert (tmp_path / "work" / "ft" / "metrics.jsonl").exists()


def test_plain_torch_model_learns_the_qc_preference(tmp_path):
    data = make_synthetic(SyntheticConfig(n_images=24, size=32, seed=1))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 3, padding=1))
    truth = data.masks.astype(np.uint8)
    empty = np.zeros_like(truth)
    full = np.ones_like(truth)
    candidates = np.stack([truth, empty, full], axis=1)
    scores = np.tile([1.0, 0.5, 0.0], (len(truth), 1))  # the QC signal prefers the truth
    bank = rn.make_bank(tmp_path / "bank", candidates)
    pairs = rn.mine_pairs(bank, scores, data.images, model)
    assert pairs.counts["kept"] == 2 * len(truth) - pairs.counts["empty_region"]
    before = [p.detach().clone() for p in model.parameters()]
    records = rn.preference_finetune(model, data.images, bank, pairs, out_dir=tmp_path / "ft", method="rn-dpo",
                                     beta=1.0, lr=3e-3, steps=30, eval_every=10)
    assert records[-1]["rewards/accuracies"] > 0.75  # chance is 0.5
    assert records[-1]["rewards/margins"] > records[1]["rewards/margins"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_api_rejects_bad_candidates(tmp_path):
    with pytest.raises(RndpoError, match="at least 2 candidates"):
        rn.make_bank(tmp_path / "b1", np.zeros((3, 1, 8, 8), dtype=np.uint8))
    with pytest.raises(RndpoError, match="integer labels"):
        rn.make_bank(tmp_path / "b2", np.zeros((3, 2, 8, 8), dtype=np.float32))
    with pytest.raises(RndpoError, match=r"\(N, K, \*spatial\)"):
        rn.make_bank(tmp_path / "b3", np.zeros((2, 8, 8), dtype=np.uint8))
