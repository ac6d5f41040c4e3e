"""Region-identity ``mask_logratio`` vs the brute-force difference of summed per-pixel log-probs.

Both are timed side by side in one run (forward + backward, median of repeats) on the same inputs;
peak memory is measured per implementation in a fresh subprocess (growth of the peak RSS, VmHWM
reset after the inputs are built, on CPU; ``torch.cuda.max_memory_allocated`` on CUDA), so one does not inherit the other's cache.

    python benchmarks/bench_objectives.py            # CPU, all threads
    python benchmarks/bench_objectives.py --repeats 5 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from rndpo.objectives import mask_logratio

SHAPES = {"binary 2D (16,1,256,256)": (16, 1, 256, 256), "4-class 3D (2,4,96,96,96)": (2, 4, 96, 96, 96)}


def brute_force_logratio(logits: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The straight port: full per-pixel log-probabilities of both masks, summed, subtracted."""
    if logits.shape[1] == 1:
        z = logits[:, 0]
        log_fg, log_bg = F.logsigmoid(z), F.logsigmoid(-z)
        logp = lambda y: (y * log_fg + (1 - y) * log_bg).flatten(1).sum(1)  # noqa: E731
        return logp(chosen.to(z.dtype)) - logp(rejected.to(z.dtype))
    log_probs = torch.log_softmax(logits, dim=1)
    logp = lambda y: log_probs.gather(1, y.unsqueeze(1)).flatten(1).sum(1)  # noqa: E731
    return logp(chosen) - logp(rejected)


def region_identity(logits, chosen, rejected):
    return mask_logratio(logits, chosen, rejected)[0]


IMPLS = {"region-identity": region_identity, "brute-force": brute_force_logratio}


def make_inputs(shape, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen)
    classes = 2 if shape[1] == 1 else shape[1]
    chosen = torch.randint(0, classes, (shape[0], *shape[2:]), generator=gen)
    rejected = chosen.clone()
    # proposals of one image disagree on a thin band: ~5 % of the pixels
    band = torch.rand(chosen.shape, generator=gen) < 0.05
    rejected[band] = (chosen[band] + 1) % classes
    return logits.to(device), chosen.to(device), rejected.to(device)


def step(fn, logits, chosen, rejected):
    leaf = logits.detach().requires_grad_(True)
    fn(leaf, chosen, rejected).sum().backward()
    return leaf.grad


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_side_by_side(shape, device, repeats):
    inputs = make_inputs(shape, device)
    times = {name: [] for name in IMPLS}
    for name, fn in IMPLS.items():  # warm-up
        step(fn, *inputs)
    for _ in range(repeats):  # interleaved, so drift hits both alike
        for name, fn in IMPLS.items():
            sync(device)
            start = time.perf_counter()
            step(fn, *inputs)
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(impl: str, shape_key: str, device: str) -> int:
    """Run in a fresh process: peak extra memory of one forward+backward, in bytes."""
    inputs = make_inputs(SHAPES[shape_key], device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(IMPLS[impl], *inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as handle:  # reset the peak-RSS mark (VmHWM) to now
        handle.write("5")
    base = _status_bytes("VmRSS")
    step(IMPLS[impl], *inputs)
    return _status_bytes("VmHWM") - base


def peak_memory(impl, shape_key, device):
    out = subprocess.run(
        [sys.executable, __file__, "--child", impl, shape_key, "--device", device],
        check=True, capture_output=True, text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.child:
        print(peak_memory_child(args.child[0], args.child[1], args.device))
        return

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}; forward+backward, median of {args.repeats}")
    header = f"{'shape':28s} {'identity ms':>12s} {'brute ms':>10s} {'speed-up':>9s} {'identity MiB':>13s} {'brute MiB':>10s} {'mem ratio':>9s}"
    print(header)
    print("-" * len(header))
    rows = []
    for key, shape in SHAPES.items():
        times = time_side_by_side(shape, args.device, args.repeats)
        mem = {name: peak_memory(name, key, args.device) for name in IMPLS}
        row = {
            "shape": key,
            "identity_ms": times["region-identity"] * 1e3,
            "brute_ms": times["brute-force"] * 1e3,
            "speedup": times["brute-force"] / times["region-identity"],
            "identity_mib": mem["region-identity"] / 2**20,
            "brute_mib": mem["brute-force"] / 2**20,
        }
        row["memory_ratio"] = row["brute_mib"] / max(row["identity_mib"], 1e-9)
        rows.append(row)
        print(f"{key:28s} {row['identity_ms']:12.1f} {row['brute_ms']:10.1f} {row['speedup']:8.2f}x "
              f"{row['identity_mib']:13.1f} {row['brute_mib']:10.1f} {row['memory_ratio']:8.2f}x")
    if args.json:
        from rndpo.io import write_json

        write_json(args.json, {"device": args.device, "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
