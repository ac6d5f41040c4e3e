"""Fault tolerance: SIGKILL at any moment, rerun the same command, same results; unsafe or broken
checkpoints are refused with the file named."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rndpo.demo import demo_config
from rndpo.errors import CheckpointError


def small_config(path: Path) -> Path:
    cfg = demo_config(quick=True).model_dump(mode="json")
    cfg["judges"] = ["oracle"]
    cfg["methods"] = [{"method": "rn-dpo", "betas": [1.0]}]
    cfg["base"].update(steps=60, checkpoint_every=10)
    cfg["finetune"].update(steps=30, eval_every=5, checkpoint_every=5)
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "rndpo.cli", "--threads", "1", "run", str(config), "--out", str(out),
            "--no-report", "--no-progress"]


def run_to_end(config: Path, out: Path) -> None:
    result = subprocess.run(command(config, out), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def kill_when(config: Path, out: Path, ready) -> None:
    """Start the run, SIGKILL it as soon as ``ready()`` holds (checked every 50 ms)."""
    process = subprocess.Popen(command(config, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not ready():
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting to kill"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def curves(out: Path) -> dict[str, list[dict]]:
    result = {}
    for metrics in sorted(out.glob("cells/*/metrics.jsonl")):
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        result[metrics.parent.name] = [{k: v for k, v in r.items() if k != "time_s"} for r in records]
    return result


@pytest.mark.slow
def test_sigkill_during_base_training_and_finetuning_then_resume(tmp_path):
    config = small_config(tmp_path / "exp.yaml")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(config, straight)

    # 1) killed during base training, after its first resumable checkpoint
    kill_when(config, killed, lambda: any(killed.glob("stages/base-*/state.safetensors")))
    assert not any(killed.glob("stages/base-*/done.json"))
    # 2) killed again in the middle of fine-tuning (after a few evaluations)
    kill_when(config, killed, lambda: any(lines(p) >= 3 for p in killed.glob("cells/*/metrics.jsonl")))
    assert not any(killed.glob("cells/*/done.json"))
    # 3) the same command finishes the run
    run_to_end(config, killed)

    assert curves(killed) == curves(straight)
    assert [r["step"] for r in next(iter(curves(killed).values()))] == [0, 5, 10, 15, 20, 25, 30]
    (straight_rows, killed_rows) = [(p / "results.csv").read_text().splitlines() for p in (straight, killed)]
    strip = lambda rows: [",".join(v for i, v in enumerate(r.split(",")) if i != 22) for r in rows]  # noqa: E731 (wall_s)
    assert strip(killed_rows) == strip(straight_rows)
    assert not list(killed.glob("**/*.tmp"))  # no half-written files left behind


def test_pickle_disguised_as_checkpoint_is_refused(tmp_path):
    from rndpo.config import ModelConfig
    from rndpo.data import make_synthetic
    from rndpo.models import build_model
    from rndpo.training.checkpoint import load_model, model_meta, save_model
    from rndpo.training.loop import load_state

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    cfg = ModelConfig(channels=(8, 16))
    model = build_model(cfg, spatial_dims=2, in_channels=1, num_classes=2)
    evil = save_model(tmp_path / "best.safetensors", model, model_meta(cfg, make_synthetic()))
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}))  # the weights file replaced by a pickle
    with pytest.raises(CheckpointError, match="best.safetensors"):
        load_model(evil)
    with pytest.raises(CheckpointError, match="best.safetensors"):
        load_state(evil)
    assert not (tmp_path / "pwned").exists()


def test_truncated_state_names_the_file(tmp_path):
    import torch

    from rndpo.training.loop import load_state, save_state

    path = tmp_path / "state.safetensors"
    save_state(path, {"step": 3, "weights": torch.ones(1000)})
    assert load_state(path)["step"] == 3
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="state.safetensors"):
        load_state(path)


def test_no_unsafe_torch_load_in_the_package():
    root = Path(__file__).resolve().parents[1] / "src"
    offenders = [f"{p}:{n}" for p in root.rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
                 if "torch.load(" in line and "weights_only=True" not in line]
    assert not offenders, offenders
