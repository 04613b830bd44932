"""Compile every Triton kernel variant elastic_fx launches, for sm_80 and sm_90, on a CPU.

The worker of ``tests/kernels/test_compile.py``; also prints the table of
``benchmarks/results/kernels_compile.md``::

    python tests/kernels/_compile_variants.py --markdown [--all]

Takes nothing but the installed Triton (its own ptxas and cuobjdump); returns one JSON
line per (variant, arch) on stdout, or a markdown table; writes only Triton's kernel cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``: a second run reads the cubins back
instead of compiling them again). It must run WITHOUT ``TRITON_INTERPRET``: then
``@triton.jit`` gives real ``JITFunction`` objects and the launchers pick their GPU tiles
and autotune configs (under the interpreter they pick small tiles and one config).

Which variants: the real launchers run on CPU tensors of representative workloads
(ViT-B/16 shapes, plus the edge cases that select other constexprs), with the Triton
kernel objects swapped for recorders, so each recorded launch carries exactly the
arguments, constexprs and launch options the launcher computes on a GPU. An autotuned
kernel expands into the configs its pruning keeps for that launch. Each launch is bound
with Triton's own argument specialisation (types, 16-byte alignment, ints equal to 1)
and compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``;
duplicates (same kernel, signature, constexprs, attributes, options) compile once.
``cuobjdump --dump-resource-usage`` of the cubin gives the registers and the stack frame
(bytes of local memory per thread: the spills); Triton's metadata the shared memory. On a
GPU, Triton's ``n_spills`` is that local memory / 4.

Masked attention has three code paths by head dim: 64 (``BLOCK_D == HEAD_DIM``), 80
(``BLOCK_D`` = 128, masked columns) and 256 (over 128: pruning keeps only small tiles).
Every autotune config is compiled at 64; at 80 and 256 only the first config its pruning
keeps (the smallest tile, the one it never drops), and fp32 only at 64, unless ``--all``:
the exact (FMA, non-tensor-core) fp32 dots take from seconds to minutes each to compile
at the larger head dims.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

ARCHS = (80, 90)
# Largest shared memory one block may use (opt-in dynamic), A100 / H100, in bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass
class Launch:
    """One kernel launch as a launcher made it (args and kwargs exactly as passed)."""

    kernel: str  # short name, e.g. "sqgrad_partial"
    fn: Any  # the JITFunction (the Autotuner's .fn for an autotuned kernel)
    args: tuple
    kwargs: Dict[str, Any]
    note: str = ""  # what the workload stands for
    configs: Optional[list] = None  # autotune configs kept by the kernel's pruning


@dataclass
class Variant:
    kernel: str
    fn: Any
    args: tuple
    kwargs: Dict[str, Any]  # constexprs + num_warps / num_stages
    note: str
    autotuned: bool  # one of the configs of an autotuned launch (the autotuner picks among them)
    launch: int  # index of the launch it came from: the configs of one launch share it
    meta: Dict[str, Any] = field(default_factory=dict)  # what the table shows


class _Recorder:
    """Stands in for ``kernel`` in its module: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, kernel: Any, out: List[Launch], workload: Dict[str, Any]):
        self.name, self.kernel, self.out = name, kernel, out
        self.workload = workload  # {"note": what runs now, "all_configs": expand every autotune config?}

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            configs = None
            fn = self.kernel
            if hasattr(self.kernel, "prune_configs"):  # triton.autotune
                self.kernel.nargs = dict(zip(self.kernel.arg_names, args))
                configs = self.kernel.prune_configs(kwargs)
                configs = configs if self.workload["all_configs"] else configs[:1]
                fn = self.kernel.fn
            self.out.append(Launch(self.name, fn, args, dict(kwargs), self.workload["note"], configs))

        return record


@contextlib.contextmanager
def _patched(module, **attrs) -> Iterator[None]:
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def _module(name: str):
    # elastic_fx.kernels re-exports functions named like their modules: go through sys.modules
    return importlib.import_module(f"elastic_fx.kernels.{name}")


def capture(include_slow: bool = False) -> List[Launch]:
    """Run every launcher on its workloads with recorders in place of the kernels."""
    import torch

    sq, gh, ma = _module("sqgrad"), _module("ghost_sqnorm"), _module("masked_attention")
    if _module("_dispatch")._INTERPRETED:
        raise RuntimeError("run without TRITON_INTERPRET: the interpreter picks other tiles")
    out: List[Launch] = []
    workload: Dict[str, Any] = {}
    rec = {name: _Recorder(name, getattr(mod, attr), out, workload) for name, mod, attr in (
        ("sqgrad_partial", sq, "_sqgrad_partial_kernel"),
        ("sqgrad_reduce", sq, "_sqgrad_reduce_kernel"),
        ("sqgrad_gather", sq, "_sqgrad_gather_kernel"),
        ("ghost_sqnorm", gh, "_ghost_sqnorm_kernel"),
        ("masked_attention", ma, "_masked_attention_kernel"),
    )}
    yes = lambda *a, **k: True  # noqa: E731  the launchers refuse CPU tensors outside the interpreter
    with _patched(sq, use_triton=yes, _sqgrad_partial_kernel=rec["sqgrad_partial"],
                  _sqgrad_reduce_kernel=rec["sqgrad_reduce"], _sqgrad_gather_kernel=rec["sqgrad_gather"]), \
            _patched(gh, use_triton=yes, _ghost_sqnorm_kernel=rec["ghost_sqnorm"]), \
            _patched(ma, _use_triton=yes, _masked_attention_kernel=rec["masked_attention"]):
        for workload["note"], run, workload["all_configs"] in _workloads(torch, sq, gh, ma, include_slow):
            run()
    return out


def _vit_block_jobs(torch, sq, dtype, fisher: bool, embed=768, heads=12, hidden=3072):
    """The jobs of one ViT-B/16 block: fused qkv weight + bias, out-projection, fc1 + bias, fc2."""
    hd = embed // heads
    rows = torch.stack([torch.cat([torch.arange(p * embed + h * hd, p * embed + (h + 1) * hd) for p in range(3)])
                        for h in range(heads)])
    cols = torch.arange(embed).view(heads, hd)
    neurons = torch.arange(hidden)[:, None]
    head_out, neuron_out = torch.zeros(heads), torch.zeros(hidden)
    specs = [((3 * embed, embed), 0, rows, head_out), ((3 * embed,), 0, rows, head_out),
             ((embed, embed), 1, cols, head_out), ((hidden, embed), 0, neurons, neuron_out),
             ((hidden,), 0, neurons, neuron_out), ((embed, hidden), 1, neurons, neuron_out)]
    return [sq.SqgradJob(torch.empty(shape, dtype=dtype), dim, index, out,
                         torch.empty(shape) if fisher else None) for shape, dim, index, out in specs]


def _workloads(torch, sq, gh, ma, include_slow: bool):
    """(note, thunk, every autotune config?) triples; each thunk calls a public launcher once."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for dname, dtype in dtypes.items():
        for fisher in (False, True):
            yield (f"ViT-B/16 block, {dname}, fisher={fisher}",
                   lambda d=dtype, f=fisher: sq.sqgrad_accumulate_many(_vit_block_jobs(torch, sq, d, f),
                                                                       backend="triton"), True)
        # one program per tile: long rows split into chunks, summed by the phase-2 reduce
        yield (f"ViT-B/16 block, {dname}, steps_per_program=1",
               lambda d=dtype: sq.sqgrad_accumulate_many(_vit_block_jobs(torch, sq, d, False), backend="triton",
                                                         steps_per_program=1), True)
        # a row length that is no multiple of 16 bytes: the unvectorised phase 1 (VEC=1)
        yield (f"odd row length, {dname}", lambda d=dtype: sq.sqgrad_accumulate_many(
            [sq.SqgradJob(torch.empty(37, 13, dtype=d), 0, torch.arange(37)[:, None], torch.zeros(37)),
             sq.SqgradJob(torch.empty(37, 13, dtype=d), 0, torch.arange(37)[:, None], torch.zeros(37),
                          torch.empty(37, 13))], backend="triton"), True)
    # phase-3 tiles: BLOCK_K = next power of two of the largest K (<= 128), BLOCK_S the rest of
    # GATHER_TILE; the ViT block above gives K = 128, these the widest tiles (more registers)
    tile = _module("_sqgrad_schedule").GATHER_TILE
    for k in (1, 2, 16):
        s = max(1, tile // k)
        yield (f"gather tile S={s} K={k}", lambda s=s, k=k: sq.sqgrad_accumulate_many(
            [sq.SqgradJob(torch.empty(s * k, 4), 0, torch.arange(s * k).view(s, k), torch.zeros(s))],
            backend="triton"), True)
    for dname, dtype in dtypes.items():
        yield (f"ViT-B/16 qkv, B=16, {dname}", lambda d=dtype: gh.ghost_sqnorm(
            torch.empty(16, 197, 768, dtype=d), torch.empty(16, 197, 2304, dtype=d), backend="triton"), True)
    # masked attention: q/k/v permuted views of one packed qkv tensor, as the search makes them
    # (head dims: see the module docstring)
    for dname, dtype in dtypes.items():
        for d in (64, 80, 256):
            if dtype == torch.float32 and d > 64 and not include_slow:
                continue
            yield (f"C=2 B=2 H=12 N=197 d={d}, {dname}", lambda d=d, dt=dtype: _masked(torch, ma, dt, d),
                   d == 64 or include_slow)


def _masked(torch, ma, dtype, d: int, C=2, B=2, H=12, N=197):
    qkv = torch.empty(C, B, N, 3, H, d, dtype=dtype)
    q, k, v = (qkv[:, :, :, i].permute(0, 1, 3, 2, 4) for i in range(3))
    ma.masked_attention(q, k, v, torch.ones(C, H, dtype=torch.bool), backend="triton")


def variants(include_slow: bool = False) -> List[Variant]:
    """Every distinct variant, in a fixed order (autotuned launches expanded per config)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    seen, result = set(), []
    launches = capture(include_slow)
    # the int64 index buffer (over 2**31 index entries: no workload here is that large) is
    # the first gather launch with its index buffer widened
    gather = next(x for x in launches if x.kernel == "sqgrad_gather")
    launches.append(Launch(gather.kernel, gather.fn, (gather.args[0], gather.args[1].long(), *gather.args[2:]),
                           gather.kwargs, gather.note + ", int64 index"))
    for n, launch in enumerate(launches):
        for cfg in launch.configs or [None]:
            kwargs = dict(launch.kwargs)
            if cfg is not None:
                kwargs.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            signature, constexprs, attrs, options = _bind(launch.fn, backend, launch.args, kwargs)
            key = (launch.kernel, tuple(signature.items()), tuple(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), options.num_warps, options.num_stages)
            if key in seen:
                continue
            seen.add(key)
            meta = {k: v for k, v in kwargs.items() if k.isupper() and k not in ("UPCAST", "DOT_IN_FP32")}
            meta["warps"], meta["stages"] = options.num_warps, options.num_stages
            ptr_types = [t for t in signature.values() if t.startswith("*")]
            meta["dtype"] = ptr_types[0][1:]
            meta["ints==1"] = sum(1 for (i,), v in constexprs.items()
                                  if v == 1 and not launch.fn.arg_names[i].isupper())
            result.append(Variant(launch.kernel, launch.fn, launch.args, kwargs, launch.note,
                                  launch.configs is not None, n, meta))
    return result


def _bind(fn, backend, args, kwargs):
    """Triton's own specialisation of a launch: (signature, constexprs, attrs, options).

    What ``JITFunction.run`` does before it compiles (Triton 3.x internals: the binder of
    ``triton.runtime.jit`` and ``JITFunction._pack_args``), without asking a driver for a device.
    """
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers per thread, stack frame and local memory (bytes per thread), static shared bytes."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path], check=True,
                              capture_output=True, text=True).stdout
    m = _RESOURCES.search(text)
    if m is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    regs, stack, static_shared, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_shared": static_shared, "local": local}


def compile_variant(v: Variant, arch: int, index: int = 0) -> Dict[str, Any]:
    """Compile one variant for sm_<arch>; the ptxas figures, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    row = {"kernel": v.kernel, "arch": arch, "note": v.note, "autotuned": v.autotuned, "launch": v.launch,
           "index": index, **v.meta}
    t0 = time.perf_counter()
    try:
        signature, constexprs, attrs, options = _bind(v.fn, backend, v.args, v.kwargs)
        with contextlib.redirect_stdout(io.StringIO()):  # Triton prints the PTX of a failed ptxas run
            kernel = triton.compile(ASTSource(v.fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        usage = resource_usage(kernel.asm["cubin"])
    except Exception as e:  # noqa: BLE001  every failure is a result to report
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[:400]}")
    else:
        row.update(ok=True, **usage, n_spills=(usage["stack"] + usage["local"]) // 4,
                   shared=int(kernel.metadata.shared))
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def markdown(rows: List[Dict[str, Any]]) -> str:
    """One table row per (variant, arch), grouped by kernel."""
    lines = ["| kernel | arch | dtype | constexprs | warps | stages | regs | spills (stack B) | shared B "
             "| compile s | workload |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        consts = " ".join(f"{k}={v}" for k, v in r.items()
                          if k.isupper() and k != "DOT_PRECISION" or k == "DOT_PRECISION" and r["dtype"] == "fp32")
        consts += f" ints==1:{r['ints==1']}" if r.get("ints==1") else ""
        if r["ok"]:
            figures = f"{r['regs']} | {r['stack'] + r['local']} | {r['shared']} | {r['seconds']}"
        else:
            figures = f"FAILED | | | {r['seconds']}"
        lines.append(f"| {r['kernel']} | sm_{r['arch']} | {r['dtype']} | {consts} | {r['warps']} | {r['stages']} "
                     f"| {figures} | {r['note']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--all", action="store_true", help="include the slow fp32 masked-attention variants")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table instead of JSON lines")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        print("unset TRITON_INTERPRET: compiling needs the real JIT functions", file=sys.stderr)
        return 2
    jobs = [(i, v, arch) for i, v in enumerate(variants(args.all)) for arch in ARCHS]
    rows = []
    for i, v, arch in jobs[args.shard::args.shards]:
        row = compile_variant(v, arch, i)
        rows.append(row)
        if not args.markdown:
            print(json.dumps(row), flush=True)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
