"""Every Triton kernel variant elastic_fx launches compiles for sm_80 and sm_90, without a GPU.

The variants come from the real launchers (see ``_compile_variants.py``, the worker): each
dtype, each constexpr combination the launchers pick on a GPU, each autotune config that
pruning keeps. The worker runs in subprocesses without ``TRITON_INTERPRET`` (the rest of
the suite keeps the interpreter) and compiles with Triton's own ptxas; the kernel cache
(``~/.triton/cache`` or ``TRITON_CACHE_DIR``) makes a second run fast. Run with ``-s`` to
see the table (registers, spills, shared memory per variant and arch);
``ELASTIC_FX_COMPILE_ALL=1`` adds the slow fp32 masked-attention variants.

The bounds, per arch:

* every variant compiles;
* shared memory fits the arch (``SHARED_LIMIT``: A100 / H100 opt-in maximum per block);
  for an autotuned launch, at least one of its configs fits (the autotuner drops the others);
* spills (ptxas's stack frame, bytes per thread; Triton's ``n_spills`` is this / 4) stay
  within ``SPILL_BOUND_BYTES`` per kernel (fp32 masked attention has its own). For an
  autotuned launch the bound applies to its best config that fits, since the autotuner
  can always pick that one. The bounds are today's spills with headroom: they fail on a
  change (a tile, a Triton release) that makes a kernel spill much more, and each comment
  says where it spills now. benchmarks/results/kernels_compile.md holds the full table.

Cold (empty kernel cache) the default set takes about a minute on 2 busy CPU cores;
with the cache, seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from _compile_variants import ARCHS, SHARED_LIMIT, markdown

WORKER = Path(__file__).with_name("_compile_variants.py")
REPO = Path(__file__).resolve().parents[2]
WORKERS = 2  # subprocesses, each compiling every other variant
TIMEOUT_S = 900
ALL_ENV = "ELASTIC_FX_COMPILE_ALL"

# Bytes of stack per thread allowed (today's worst case, Triton 3.8, in the comment).
SPILL_BOUND_BYTES = {
    "sqgrad_partial": 512,  # 304 B: VEC=1 with fisher, fp16, sm_90 (unvectorised: one address per element)
    "sqgrad_reduce": 0,
    "sqgrad_gather": 128,  # 16 B: the widest tile, BLOCK_S=4096 x BLOCK_K=1, sm_90
    "ghost_sqnorm": 0,
    # best config per launch: 0 B for fp16/bf16 at d=64 on both archs and at every d on sm_90;
    # 24 B at d=80 and 1.2 KB at d=256 on sm_80
    "masked_attention": 2048,
    # fp32 runs tf32x3 tensor-core dots on the FP32_TILES: 0 B at d=64 on both archs (the exact
    # FMA dots it used before spilled 1.7 KB at best)
    "masked_attention_fp32": 64,
    # fp32 at d=80/256 (BLOCK_D >= 128, ELASTIC_FX_COMPILE_ALL=1): ~0.6 KB on sm_90, ~3 KB on sm_80
    # (were 6.9-16.5 KB)
    "masked_attention_fp32_wide": 4096,
}


def _bound(row) -> int:
    if row["kernel"] == "masked_attention" and row["dtype"] == "fp32":
        return SPILL_BOUND_BYTES["masked_attention_fp32" if row["BLOCK_D"] <= 64 else "masked_attention_fp32_wide"]
    return SPILL_BOUND_BYTES[row["kernel"]]


def _triton_can_compile_for_cuda() -> bool:
    try:
        from triton import knobs

        return Path(knobs.nvidia.ptxas.path).exists() and Path(knobs.nvidia.cuobjdump.path).exists()
    except Exception:  # noqa: BLE001  no NVIDIA backend in this Triton build
        return False


@pytest.fixture(scope="module")
def compiled():
    """One row per (variant, arch): the worker's JSON, gathered from every subprocess."""
    if not _triton_can_compile_for_cuda():
        pytest.skip("this Triton has no NVIDIA backend with ptxas and cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    extra = ["--all"] if os.environ.get(ALL_ENV, "0").strip() == "1" else []
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--shard", str(i), "--shards", str(WORKERS), *extra],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(WORKERS)]
    rows = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, f"compile worker exited with {p.returncode}:\n{err[-4000:]}"
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    rows.sort(key=lambda r: (r["index"], r["arch"]))
    print("\n" + markdown(rows))
    return rows


def test_every_variant_compiles(compiled):
    kernels = {"sqgrad_partial", "sqgrad_reduce", "sqgrad_gather", "ghost_sqnorm", "masked_attention"}
    for arch in ARCHS:
        assert {r["kernel"] for r in compiled if r["arch"] == arch} == kernels, f"sm_{arch}: a kernel is missing"
    failed = [f"{r['kernel']} sm_{r['arch']} {r['note']}: {r['error']}" for r in compiled if not r["ok"]]
    assert not failed, "variants that do not compile:\n" + "\n".join(failed)


def _launches(rows):
    """Rows grouped by (launch, arch): one row, or the configs of one autotuned launch."""
    groups = defaultdict(list)
    for r in rows:
        if r["ok"]:
            groups[(r["launch"], r["arch"])].append(r)
    return groups.values()


def test_shared_memory_fits(compiled):
    too_big = []
    for group in _launches(compiled):
        fits = [r for r in group if r["shared"] <= SHARED_LIMIT[r["arch"]]]
        if not fits:
            r = min(group, key=lambda r: r["shared"])
            too_big.append(f"{r['kernel']} sm_{r['arch']} {r['note']}: {r['shared']} B shared > "
                           f"{SHARED_LIMIT[r['arch']]} B")
    assert not too_big, "launches with no config that fits shared memory:\n" + "\n".join(too_big)


def test_spills_within_bound(compiled):
    over = []
    for group in _launches(compiled):
        fits = [r for r in group if r["shared"] <= SHARED_LIMIT[r["arch"]]] or group
        best = min(fits, key=lambda r: r["stack"] + r["local"])
        spilled, bound = best["stack"] + best["local"], _bound(best)
        if spilled > bound:
            over.append(f"{best['kernel']} sm_{best['arch']} {best['note']} warps={best['warps']}: "
                        f"{spilled} B of stack per thread > {bound} B")
    assert not over, "spills above SPILL_BOUND_BYTES:\n" + "\n".join(over)
