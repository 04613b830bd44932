"""benchmarks/gpu_suite.py: its rehearsal runs every step on the CPU, and its deadlines hold.

The suite is what a GPU machine runs in one call; the rehearsal (toy sizes, the CPU, Triton
under its interpreter) is how it is kept working between GPU sessions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SUITE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    if not torch.cuda.is_available():  # on a GPU machine the rehearsal runs natively, at toy sizes
        env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, str(SUITE), "--out", str(out), "--rehearse"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    return p, out


def test_rehearsal_runs_every_step_and_writes_two_files(rehearsal):
    p, out = rehearsal
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert sorted(f.name for f in out.iterdir()) == ["gpu_suite.json", "gpu_suite.md"]
    result = json.loads((out / "gpu_suite.json").read_text())
    mod = _suite_module()
    assert list(result["steps"]) == list(mod.STEPS)
    assert {n: e["status"] for n, e in result["steps"].items()} == {n: "ok" for n in mod.STEPS}
    assert result["seconds"] <= result["budget_s"]


def test_rehearsal_records_versions_checks_and_figures(rehearsal):
    _, out = rehearsal
    result = json.loads((out / "gpu_suite.json").read_text())
    steps = {n: e["data"] for n, e in result["steps"].items()}
    assert steps["env"]["versions"]["torch"] and steps["env"]["versions"]["triton"]
    kernels = steps["kernels"]
    assert kernels["backend"] == "triton"  # the interpreter: the kernels themselves were checked
    assert {c["op"] for c in kernels["checks"]} == {"masked_attention", "sqgrad", "ghost_sqnorm"}
    assert kernels["checks_ok"] and kernels["pytest"]["counts"].get("passed", 0) > 0
    assert steps["sqgrad"]["rows"] and steps["masked_attention"]["rows"]
    search = steps["search"]
    assert search["max_rel_err"] <= search["max_rel_err_bound"]
    assert search["executed_flops_ratio"] >= 1.0  # the masked forward never does less than the sliced work
    assert search["fitness_bf16_vs_fp32"]["max_abs_diff"] < 1e-2
    assert steps["paper"]["paper_projected_seconds"] > 0
    # every goal is listed; a rehearsal on a CPU judges none of them
    assert set(result["goals"]) == set(_suite_module().GOALS)
    assert all(g["met"] is None for g in result["goals"].values())
    md = (out / "gpu_suite.md").read_text()
    assert "rehearsal" in md and "## Goals" in md and "## Masked attention" in md


def test_a_step_over_its_deadline_is_stopped_and_the_rest_is_skipped(tmp_path, monkeypatch):
    mod = _suite_module()

    def slow(ctx, out):
        out["started"] = True
        time.sleep(30)

    def never(ctx, out):
        raise AssertionError("a step ran after the total budget was spent")

    monkeypatch.setattr(mod, "STEPS", {"env": slow, "kernels": never})
    t0 = time.monotonic()
    result = mod.run_suite(tmp_path, rehearse=True, budget=1.5, log=lambda *a: None)
    assert time.monotonic() - t0 < 10
    assert result["steps"]["env"]["status"].startswith("timeout")
    assert result["steps"]["env"]["data"] == {"started": True}  # what it measured before the deadline is kept
    assert result["steps"]["kernels"]["status"].startswith("skipped")
    assert (tmp_path / "gpu_suite.json").is_file() and (tmp_path / "gpu_suite.md").is_file()


def test_a_failing_step_is_recorded_and_the_suite_goes_on(tmp_path, monkeypatch):
    mod = _suite_module()
    ran = []

    def broken(ctx, out):
        raise RuntimeError("boom")

    monkeypatch.setattr(mod, "STEPS", {"env": broken, "kernels": lambda ctx, out: ran.append(1)})
    result = mod.run_suite(tmp_path, rehearse=True, budget=30, log=lambda *a: None)
    assert result["steps"]["env"]["status"] == "error: RuntimeError: boom"
    assert "boom" in result["steps"]["env"]["traceback"]
    assert result["steps"]["kernels"]["status"] == "ok" and ran == [1]
