"""Preference fine-tuning throughput: rndpo's trainer step vs a naive DPO loop, and vs a supervised step.

Same model, images and pairs for all three, measured side by side in one run (median of repeats):

* **rndpo**: one policy forward/backward per image; every pair of the image scored from it with the
  disagreement region (``mask_logps(image_index=…)``); reference log-ratios precomputed
  at mining, so no reference forward (``rndpo.training.finetune``'s step loss).
* **naive**: the straight port of LLM DPO: for every pair, a policy forward of its image, a reference
  forward (frozen copy), full per-pixel log-probabilities of both masks under both models.
* **supervised**: one DiceCE step on the same images (their chosen masks).

K = 8 proposals per image (truth-derived morphological variants), top-vs-rest mining (7 pairs per
image). Before timing, the first-step losses of rndpo and naive are checked to agree to 1e-5 (the
policy is the reference with perturbed weights, so the loss is not trivially log 2).

    python benchmarks/bench_finetune.py                 # 128², 8 images per step
    python benchmarks/bench_finetune.py --size 64 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from rndpo.bank import ProposalBank
from rndpo.config import FinetuneConfig, MiningConfig, ModelConfig, SyntheticConfig
from rndpo.data import make_synthetic
from rndpo.metrics import dice_per_case
from rndpo.mining import attach_reference, mine_pairs
from rndpo.models import build_model
from rndpo.training.finetune import FinetuneInputs, _StepLoss
from rndpo.training.losses import SupervisedLoss


def variants(mask: np.ndarray) -> np.ndarray:
    """K = 8 distinct candidate masks of one ground-truth mask."""
    s = ndimage.generate_binary_structure(2, 1)
    out = [mask, ndimage.binary_erosion(mask, s, 1), ndimage.binary_erosion(mask, s, 3),
           ndimage.binary_dilation(mask, s, iterations=1), ndimage.binary_dilation(mask, s, iterations=3),
           np.roll(mask, 2, axis=0), np.roll(mask, -3, axis=1), ndimage.binary_opening(mask, s, iterations=2)]
    return np.stack(out).astype(np.uint8)


def brute_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    z = logits[:, 0]
    y = labels.to(z.dtype)
    return (y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).flatten(1).sum(1)


def naive_step_loss(policy, reference, images, bank, pairs, rows, beta):
    """Per pair: policy forward + reference forward + full log-probs; mean DPO loss over the pairs."""
    losses = []
    for r in rows:
        case = int(pairs.case_index[r])
        x = images[case : case + 1]
        masks = torch.from_numpy(bank.masks(case))
        chosen, rejected = masks[pairs.chosen[r]][None].long(), masks[pairs.rejected[r]][None].long()
        logits = policy(x)
        with torch.no_grad():
            ref_logits = reference(x)
        h = (brute_logp(logits, chosen) - brute_logp(logits, rejected)) - (
            brute_logp(ref_logits, chosen) - brute_logp(ref_logits, rejected))
        losses.append(-F.logsigmoid(beta * h))
    return torch.cat(losses).mean()


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=8, help="images per step")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    data = make_synthetic(SyntheticConfig(n_images=args.images, size=args.size, seed=0))
    candidates = np.stack([variants(m.astype(bool)) for m in data.masks])
    scores = np.stack([dice_per_case(candidates[:, k], data.masks, 2) for k in range(8)], axis=1)
    scores += np.linspace(1e-6, 0, 8)  # deterministic tie-break
    workdir = Path(tempfile.mkdtemp())
    with ProposalBank.create(workdir / "bank", case_ids=data.case_ids, spatial_shape=(args.size, args.size),
                             num_classes=2, k_max=8, generators=["variants"], dedupe=False) as writer:
        writer.add(np.arange(len(data)), candidates, np.zeros((len(data), 8), dtype=np.int16))
    bank = ProposalBank.open(workdir / "bank")

    reference = build_model(ModelConfig(dropout=0.0), spatial_dims=2, in_channels=1, num_classes=2).eval()
    pairs = attach_reference(mine_pairs(scores, bank, MiningConfig(strategy="top-vs-rest")), bank, reference, data.images)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.eval()
    for p in reference.parameters():
        p.requires_grad_(False)

    cfg = FinetuneConfig(method="dpo", beta=0.01)
    step_loss = _StepLoss(policy, cfg, FinetuneInputs(pool_images=data.images, bank=bank, pairs=pairs), num_channels=1)
    cases = np.arange(len(data))
    rows = np.concatenate([step_loss.groups[int(c)] for c in cases])
    images = torch.from_numpy(data.images)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)  # lr 0: every repeat times the same step
    supervised = SupervisedLoss(1)
    targets = torch.from_numpy(np.stack([bank.masks(int(c))[0] for c in cases])).long()

    fast_loss = step_loss(0, cases)[0]
    naive_loss = naive_step_loss(policy, reference, images, bank, pairs, rows, cfg.beta)
    gap = abs(fast_loss.item() - naive_loss.item())
    assert gap <= 1e-5, f"first-step losses differ by {gap:.2e}"

    def run_fast():
        optimizer.zero_grad()
        step_loss(0, cases)[0].backward()
        optimizer.step()

    def run_naive():
        optimizer.zero_grad()
        naive_step_loss(policy, reference, images, bank, pairs, rows, cfg.beta).backward()
        optimizer.step()

    def run_supervised():
        optimizer.zero_grad()
        supervised(policy(images), targets).backward()
        optimizer.step()

    times = {}
    for _ in range(args.repeats):  # interleave the three, so load drift hits all alike
        for name, fn in (("rndpo", run_fast), ("naive", run_naive), ("supervised", run_supervised)):
            times.setdefault(name, []).append(timed(fn, 1))
    med = {name: statistics.median(values) for name, values in times.items()}
    n_pairs = len(rows)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.images} images of {args.size}², K = 8, top-vs-rest → {n_pairs} pairs per step; median of {args.repeats}")
    print(f"first-step loss: rndpo {fast_loss.item():.8f}, naive {naive_loss.item():.8f} (|Δ| = {gap:.1e})")
    print(f"{'step':28s} {'s/step':>8s} {'pairs/s':>9s}")
    for name, label in (("rndpo", "rndpo (1 fwd/image, no ref)"), ("naive", "naive (2 fwd/pair)"),
                        ("supervised", "supervised DiceCE")):
        rate = f"{n_pairs / med[name]:9.1f}" if name != "supervised" else f"{'—':>9s}"
        print(f"{label:28s} {med[name]:8.3f} {rate}")
    print(f"rndpo vs naive: {med['naive'] / med['rndpo']:.1f}x pairs/s (target >= 5x)")
    print(f"preference step / supervised step: {med['rndpo'] / med['supervised']:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
