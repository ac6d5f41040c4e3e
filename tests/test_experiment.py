"""The experiment runner end to end through the CLI: `rndpo demo --quick`, caching, cells, bad configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from rndpo.cli import main
from rndpo.config import ExperimentConfig
from rndpo.demo import demo_config
from rndpo.experiment import PER_CASE_FILE, plan_cells, read_per_case
from rndpo.stats import CASE_METRIC


def read_rows(run: Path) -> list[dict]:
    with open(run / "results.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(run), "--no-progress"]) == 0
    return run


def test_quick_demo_writes_results_report_and_stage_cache(demo_run, capsys):
    rows = read_rows(demo_run)
    cfg = demo_config(quick=True)
    regimes = {(r["judge"], r["mining"]) for r in rows}
    assert regimes == {("oracle", "top-vs-rest"), ("agreement", "top-vs-rest")}
    methods = {r["method"] for r in rows}
    assert methods == {"base", "dpo", "rn-dpo", "pseudo-label", "oracle"}
    for row in rows:
        peak, final, sustained = float(row["peak"]), float(row["final"]), float(row["sustained"])
        assert 0.0 <= final <= peak <= 1.0 and 0.0 <= sustained <= peak
        assert float(row["drop"]) == pytest.approx(peak - final)
        assert row["selected"] == "True"
    oracle_judge = [r for r in rows if r["judge"] == "oracle"]
    assert float(oracle_judge[0]["judge_accuracy"]) == pytest.approx(1.0)  # σ = 0 oracle orders perfectly
    dpo_oracle = next(r for r in oracle_judge if r["method"] == "dpo")
    assert float(dpo_oracle["pair_accuracy"]) == pytest.approx(1.0)
    base = next(r for r in rows if r["method"] == "base")
    upper = next(r for r in rows if r["method"] == "oracle")
    assert float(upper["peak"]) > float(base["peak"])  # supervision on the pool's truth helps

    stages = sorted(p.name.split("-")[0] for p in (demo_run / "stages").iterdir() if p.is_dir())
    # one base model and one bank shared by every method; one scores + pairs stage per judge
    assert stages == ["bank", "base", "pairs", "pairs", "scores", "scores"]
    assert len(list((demo_run / "cells").glob("*/done.json"))) == len(plan_cells(cfg))
    resolved = yaml.safe_load((demo_run / "config.yaml").read_text())
    assert ExperimentConfig.model_validate(resolved) == cfg
    html = (demo_run / "report" / "index.html").read_text()
    assert "data:image/png;base64," in html and "rn-dpo" in html
    for cell in (demo_run / "cells").iterdir():
        if cell.is_dir():
            assert (cell / "metrics.jsonl").exists() and (cell / "config.yaml").exists()


def test_rerun_skips_finished_cells_and_stages(demo_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in demo_run.glob("**/done.json")}
    assert main(["demo", "--quick", "--out", str(demo_run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "building" not in err and "[run]" not in err
    assert {p: p.stat().st_mtime_ns for p in demo_run.glob("**/done.json")} == before


def test_every_cell_keeps_per_case_test_dice_and_comparisons_use_them(demo_run, capsys):
    rows = read_rows(demo_run)
    for cell_id in {r["cell_id"] for r in rows}:
        folder = demo_run / "cells" / cell_id
        per_case = read_per_case(folder / PER_CASE_FILE)
        done = json.loads((folder / "done.json").read_text())
        assert len(per_case) == 24  # the quick demo's test split
        assert sum(per_case.values()) / len(per_case) == pytest.approx(done["final"], abs=1e-6)
    with open(demo_run / "comparisons.csv") as handle:
        cases = [r for r in csv.DictReader(handle) if r["metric"] == CASE_METRIC]
    assert {r["comparison"] for r in cases} >= {"rn-dpo − dpo", "dpo − base"}
    assert all(r["n_cases"] == "24" for r in cases)

    # a cell finished before per-case files existed gets one from its final weights on the next run
    cell = next(demo_run.glob("cells/rn-dpo_*"))
    before = (cell / PER_CASE_FILE).read_text()
    (cell / PER_CASE_FILE).unlink()
    assert main(["demo", "--quick", "--out", str(demo_run), "--no-progress"]) == 0
    after = read_per_case(cell / PER_CASE_FILE)
    assert after == pytest.approx(read_per_case_text(before), abs=1e-6)
    assert "[run]" not in capsys.readouterr().err


def read_per_case_text(text: str) -> dict[str, float]:
    return {row["case_id"]: float(row["dice"]) for row in csv.DictReader(text.splitlines())}


def test_shared_stages_reuse_base_proposals_and_scores_of_another_run(demo_run, tmp_path, capsys):
    """A longer fine-tuning sweep in its own run folder builds no stage: `--stages` points at the demo's."""
    config = tmp_path / "longer.yaml"
    cfg = demo_config(quick=True).model_dump(mode="json")
    cfg["methods"] = ["base", {"method": "rn-dpo", "betas": [1.0], "lrs": [1e-3]}]
    cfg["judges"] = ["oracle"]
    cfg["finetune"]["steps"] = 6
    cfg["finetune"]["eval_every"] = 2
    config.write_text(yaml.safe_dump(cfg))
    stages = demo_run / "stages"
    before = sorted(p.name for p in stages.iterdir())
    run = tmp_path / "longer"
    capsys.readouterr()
    assert main(["run", str(config), "--out", str(run), "--stages", str(stages), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "building" not in err and "[run]" in err
    assert sorted(p.name for p in stages.iterdir()) == before  # nothing new in the shared folder
    assert (run / "stages").is_symlink() and (run / "stages").resolve() == stages.resolve()
    rows = {r["method"]: r for r in read_rows(run)}
    demo_base = next(r for r in read_rows(demo_run) if r["method"] == "base")
    assert float(rows["base"]["peak"]) == pytest.approx(float(demo_base["peak"]))  # the same base model
    assert int(rows["rn-dpo"]["steps"]) == 6 and float(rows["rn-dpo"]["lr"]) == pytest.approx(1e-3)
    assert float(rows["rn-dpo"]["judge_accuracy"]) == pytest.approx(1.0)  # audit read through the link

    # a run folder that keeps its own stages refuses another stage folder, with one line
    other = tmp_path / "other-stages"
    assert main(["run", str(config), "--out", str(demo_run), "--stages", str(other), "--no-progress"]) == 1
    assert "already keeps its stages" in capsys.readouterr().err


def test_list_and_single_cell(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    cfg = demo_config(quick=True).model_dump(mode="json")
    cfg["methods"] = ["base", {"method": "rn-dpo", "betas": [0.5, 1.0]}]
    cfg["judges"] = ["oracle"]
    cfg["finetune"]["steps"] = 4
    cfg["finetune"]["eval_every"] = 2
    cfg["base"]["steps"] = 20
    config.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(config), "--list"]) == 0
    listing = capsys.readouterr().out.strip().splitlines()
    assert len(listing) == 3 and listing[0].startswith("[0]") and "beta=0.5" in listing[1]

    run = tmp_path / "run"
    assert main(["run", str(config), "--out", str(run), "--cell", "2", "--no-report", "--no-progress"]) == 0
    rows = read_rows(run)
    assert [(r["method"], float(r["beta"])) for r in rows] == [("rn-dpo", 1.0)]
    assert main(["run", str(config), "--out", str(run), "--cell", "7", "--no-progress"]) == 1
    assert "out of range" in capsys.readouterr().err


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda c: c["finetune"].update(lerning_rate=1), "finetune.lerning_rate: unknown key"),
        (lambda c: c.update(judges=["oracle+blur:1"]), "judges.0"),
        (lambda c: c["methods"].append({"method": "rn-dpo", "overrides": {"beta": 2}}), "overrides may not set"),
        (lambda c: c.update(seeds=[]), "seeds"),
    ],
)
def test_bad_configs_fail_with_one_line_naming_the_key(tmp_path, capsys, mutate, message):
    cfg = demo_config(quick=True).model_dump(mode="json")
    mutate(cfg)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_missing_config_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 1
    assert "config not found" in capsys.readouterr().err


def test_cells_share_one_base_model_per_seed():
    cfg = demo_config(quick=True)
    cells = plan_cells(cfg)
    judge_free = [c for c in cells if c.method in ("base", "oracle")]
    assert all(c.judge is None and c.mining is None for c in judge_free)
    ids = [c.cell_id for c in cells]
    assert len(set(ids)) == len(ids)
    # a changed fine-tuning setting is another cell (never a stale cached result)
    longer = plan_cells(cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"steps": 21})}))
    assert not set(ids) & {c.cell_id for c in longer}
