"""Atomic writes: all or nothing, and no litter from writers that were killed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rndpo.io import _HOST, atomic_path, read_json, read_jsonl, write_json


def test_failed_write_keeps_the_previous_content(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"version": 2, "half')
            raise RuntimeError("crash mid-write")
    assert read_json(target) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_temporaries_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".result.json.{_HOST}.{dead.pid}.x1.tmp"
    stale.write_text("half written by a killed process")
    live = tmp_path / f".result.json.{_HOST}.1.x2.tmp"  # pid 1 is alive: a concurrent writer, kept
    other_host = tmp_path / ".result.json.elsewhere.999999.x3.tmp"  # another machine's writer, kept
    for path in (live, other_host):
        path.write_text("in progress")
    write_json(tmp_path / "result.json", {"ok": True})
    assert not stale.exists() and live.exists() and other_host.exists()


def test_jsonl_reader_ignores_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 5}\n{"step": 1')
    assert read_jsonl(path) == [{"step": 0}, {"step": 5}]


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    write_json(tmp_path / "x.json", {})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~umask
