"""The configuration of ``rndpo demo``: the whole pipeline on the embedded synthetic data.

``demo_config()`` finishes in about 100 s on 2 idle CPU cores, ``demo_config(quick=True)`` in well under
a minute (the tests run it). ``rndpo demo --print-config`` prints either as YAML, a starting point
for ``rndpo run``.
"""

from __future__ import annotations

from rndpo.config import ExperimentConfig

__all__ = ["demo_config"]


def demo_config(quick: bool = False) -> ExperimentConfig:
    """The demo experiment: a reliable judge, a noisy one and a label-free one, two minings,
    DPO vs RN-DPO, and the baselines (pseudo-label, and the oracle upper bound)."""
    if quick:
        return ExperimentConfig.model_validate({
            "name": "demo-quick",
            "data": {"path": "synthetic", "size": 32, "synthetic": {"n_images": 120, "size": 32, "seed": 0}},
            "split": {"labeled": 0.2, "val": 0.15, "test": 0.2},
            "model": {"channels": [8, 16, 32], "dropout": 0.1},
            "base": {"steps": 150, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 1000},
            "proposals": {"mc_dropout": 2, "tta": ["hflip"], "thresholds": [0.3, 0.7], "morphology": ["erode:1", "dilate:1"]},
            "judges": ["oracle", "agreement"],
            "mining": [{"strategy": "top-vs-rest"}],
            "methods": ["base", {"method": "dpo", "betas": [0.01]}, {"method": "rn-dpo", "betas": [1.0]},
                        "pseudo-label", "oracle"],
            "finetune": {"steps": 20, "lr": 1e-4, "eval_every": 10, "images_per_step": 8},
            "eval": {"gallery": 4},
            "seeds": [0],
        })
    return ExperimentConfig.model_validate({
        "name": "demo",
        "data": {"path": "synthetic", "size": 64, "synthetic": {"n_images": 300, "size": 64, "seed": 0}},
        "split": {"labeled": 0.15, "val": 0.15, "test": 0.25},
        "model": {"channels": [16, 32, 64, 128], "dropout": 0.1},
        "base": {"steps": 300, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 1000},
        "proposals": {"mc_dropout": 3, "tta": ["hflip", "vflip"], "thresholds": [0.3, 0.7],
                      "morphology": ["erode:1", "dilate:1"]},
        "judges": ["oracle", "oracle+gaussian:0.3", "agreement"],
        "mining": [{"strategy": "top-vs-rest"}, {"strategy": "random-pairs", "pairs_per_image": 4}],
        "methods": ["base", {"method": "dpo", "betas": [0.01]}, {"method": "rn-dpo", "betas": [1.0]},
                    "pseudo-label", "oracle"],
        "finetune": {"steps": 60, "lr": 1e-4, "eval_every": 10, "images_per_step": 8},
        "eval": {"gallery": 6},
        "seeds": [0],
    })
