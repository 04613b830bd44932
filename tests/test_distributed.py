"""Distributed scoring and search (torch.distributed, gloo, 2 CPU processes) against one process.

The ranks are started with the environment torchrun would give them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so the library's own detection and process-group
set-up are what run. They come from a multiprocessing fork server that imported torch,
timm and elastic_fx once: a plain fork of the test process is not allowed after autograd
has run in it, and a fresh interpreter per rank would re-import everything each time.
Each rank writes what it returns to a file; the tests compare that with the same call
made in this process (one thread everywhere, as in the ranks).

What "the same" means here: the distributed design adds each batch's squared-gradient
buffer in global batch order and evaluates exactly the pair chunks one process evaluates,
so the scores, the fitness values and the xNES trajectory are compared for EQUALITY (fp32
scores bit for bit, float64 xNES state bit for bit), not with a tolerance. That holds
because both sides run the same kernels on the same machine with one thread each.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import pytest
import torch

from elastic_fx import distributed as efd
from elastic_fx.data import PreprocessConfig
from elastic_fx.errors import DataError, ElasticFxError
from elastic_fx.scoring.dino import DinoConfig
from elastic_fx.scoring.local import local_scores
from elastic_fx.pipeline import SearchConfig, prune
from elastic_fx.search.search import CHECKPOINT_NAME
from zoo import build

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo and a multiprocessing fork server",
)

WORLD = 2
SPARSITIES = (0.2, 0.4, 0.5)
PRE = PreprocessConfig((32, 32), (0.5, 0.4, 0.3), (0.25, 0.25, 0.25))
SMALL_DINO = DinoConfig(n_global=2, n_local=2)


def search_config() -> SearchConfig:
    # 10 gradient images in batches of 3 -> 4 batches (2 per rank, the last one short);
    # 10 fitness images in batches of 4 -> 3 embedding batches; popsize 10 x 3 sparsities
    # = 30 pairs in chunks of 4 -> 8 chunks, 4 per rank: candidate 5 is split across ranks.
    return SearchConfig(num_images=10, num_fitness_images=10, batch_size=3, pca_dim=6, eval_batch_size=4,
                        pair_chunk=4)


def _model():
    return build("timm_vit")[0]


def _float_images() -> torch.Tensor:
    return torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _uint8_images() -> torch.Tensor:
    return torch.randint(0, 256, (7, 3, 40, 44), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- launching ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: Path, job: Callable[[int, Path], Any], timeout_s: float) -> None:
    """Body of a forked rank: the torchrun environment, the job, its result (or error) to a file."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **{efd.ENV_TIMEOUT: str(timeout_s)})
    torch.set_num_threads(1)
    code = 0
    try:
        payload: Dict[str, Any] = {"result": job(rank, out)}
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        payload, code = {"error": type(e).__name__, "message": str(e)}, 1
    torch.save(payload, out / f"rank{rank}.pt")
    efd.shutdown()
    os._exit(code)


def _launch(job: Callable[[int, Path], Any], out: Path, timeout: float = 120.0, dist_timeout_s: float = 30.0,
            only_rank0: bool = False) -> List[Dict[str, Any]]:
    """Run ``job(rank, out)`` on WORLD forked ranks; return each rank's payload.

    ``only_rank0``: wait for rank 0 alone and kill the others then (a rank that hangs).
    """
    out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "timm", "elastic_fx.pipeline", "elastic_fx.scoring.local", __name__])
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, out, job, dist_timeout_s)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs[:1] if only_rank0 else procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():  # only our own children, by handle
            p.kill()
            p.join()
    payloads = []
    for r in range(WORLD):
        f = out / f"rank{r}.pt"
        missing = {"error": "no result", "message": f"exit code {procs[r].exitcode}"}
        payloads.append(torch.load(f, weights_only=False) if f.is_file() else missing)
    return payloads


# ----------------------------------------------------------------------------- the jobs
def _job_main(rank: int, out: Path) -> Dict[str, Any]:
    """Local scores (per-batch and per-sample loop), a 2-generation search, and the error protocol."""
    ctx = efd.current(device="cpu")  # gloo only: the test runs on the CPU
    assert ctx.enabled and ctx.rank == rank
    res: Dict[str, Any] = {"world_size": ctx.world_size}
    lo, hi = ctx.span(len(_fp64_parts()))
    res["ordered_sum"] = ctx.ordered_sum(_fp64_parts()[lo:hi], torch.zeros(64, dtype=torch.float64))
    ls = local_scores(_model(), _uint8_images(), batch_size=2, seed=3, dino=SMALL_DINO, preprocess=PRE,
                      progress=False, device="cpu")
    res["per_batch"] = (ls.head_scores, ls.neuron_scores, ls.config["mean_loss"], ls.config.get("world_size"))
    for kind in ("loop", "ghost"):
        ps = local_scores(_model(), _uint8_images()[:5], batch_size=2, seed=4, dino=SMALL_DINO, preprocess=PRE,
                          mode="per-sample", per_sample=kind, progress=False, device="cpu")
        res[kind] = (ps.head_scores, ps.neuron_scores)
    ckpt = out / f"ckpt{rank}"
    scores = prune(_model(), _float_images(), iterations=2, sparsities=SPARSITIES, config=search_config(),
                   checkpoint_dir=str(ckpt), device="cpu", progress=False)
    res["prune"] = _summary(scores)
    res["wrote_checkpoint"] = (ckpt / CHECKPOINT_NAME).is_file()
    # error protocol: rank 1's DataError reaches rank 0; rank 0's error reaches rank 1
    for name, fn in (
        ("all_or_nothing", lambda: ctx.all_or_nothing(lambda: _fail_on(1, rank), "a test step")),
        ("main_then_share", lambda: ctx.main_then_share(lambda: _fail_on(0, rank), "a test step")),
    ):
        try:
            fn()
            res[name] = None
        except ElasticFxError as e:
            res[name] = (type(e).__name__, str(e))
    # ranks that hold different weights are refused (e.g. an unseeded random initialisation)
    model = _model()
    if rank == 1:
        with torch.no_grad():
            model.blocks[1].mlp.fc1.bias[0] += 1.0
    try:
        local_scores(model, _uint8_images(), batch_size=2, dino=SMALL_DINO, preprocess=PRE, progress=False,
                     device="cpu")
        res["other_weights"] = None
    except ElasticFxError as e:
        res["other_weights"] = (type(e).__name__, str(e))
    return res


def _fp64_parts() -> List[torch.Tensor]:
    """Eight float64 buffers of very different magnitudes: how they are associated changes the sum."""
    g = torch.Generator().manual_seed(5)
    return [torch.randn(64, dtype=torch.float64, generator=g) * 10.0 ** (3 * (k % 4)) for k in range(8)]


def _fail_on(bad_rank: int, rank: int) -> int:
    if rank == bad_rank:
        raise DataError(f"image 7 is unreadable (raised on rank {rank})")
    return rank


def _job_dead_rank(rank: int, out: Path) -> Dict[str, Any]:
    """Rank 1 dies while the second generation is evaluated; rank 0 must stop with a clear error."""
    import elastic_fx.search.search as mask  # where the search looks masked_embeddings up

    real, calls = mask.masked_embeddings, []

    def dying(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 2:  # call 1: generation 1; call 2: generation 2
            os._exit(3)
        return real(*args, **kwargs)

    mask.masked_embeddings = dying
    prune(_model(), _float_images(), iterations=3, sparsities=SPARSITIES, config=search_config(),
          checkpoint_dir=str(out / "ckpt"), device="cpu", progress=False)
    return "finished"


def _job_hanging_rank(rank: int, out: Path) -> Dict[str, Any]:
    """Rank 1 hangs in the first generation; rank 0 must give up after the timeout."""
    import time

    import elastic_fx.search.search as mask  # where the search looks masked_embeddings up

    real = mask.masked_embeddings

    def hanging(*args, **kwargs):
        if rank == 1:
            time.sleep(120)  # killed by the test long before
        return real(*args, **kwargs)

    mask.masked_embeddings = hanging
    t0 = time.monotonic()
    try:
        prune(_model(), _float_images(), iterations=2, sparsities=SPARSITIES, config=search_config(),
              device="cpu", progress=False)
    except ElasticFxError as e:
        return (type(e).__name__, str(e), time.monotonic() - t0)
    return None


def _summary(scores) -> Dict[str, Any]:
    return {
        "c": scores.c, "best_fitness": scores.best_fitness, "mean_fitness": scores.mean_fitness,
        "history": [(h["generation"], h["best"], h["mean"], h["median"], h["best_so_far"]) for h in scores.history],
        "head_sums": scores.head_sums, "neuron_sums": scores.neuron_sums, "popsize": scores.config["popsize"],
    }


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    payloads = _launch(_job_main, tmp_path_factory.mktemp("dist_main"))
    for r, p in enumerate(payloads):
        assert "error" not in p, f"rank {r} failed: {p}"
    return [p["result"] for p in payloads]


@pytest.fixture(scope="module")
def one_thread():
    """The ranks run single-threaded; so does the reference (conftest only does so without CUDA)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def single(one_thread):
    """The same calls in this process (world size 1)."""
    ls = local_scores(_model(), _uint8_images(), batch_size=2, seed=3, dino=SMALL_DINO, preprocess=PRE,
                      progress=False, distributed=False)
    per_sample = {
        kind: local_scores(_model(), _uint8_images()[:5], batch_size=2, seed=4, dino=SMALL_DINO, preprocess=PRE,
                           mode="per-sample", per_sample=kind, progress=False, distributed=False)
        for kind in ("loop", "ghost")
    }
    scores = prune(_model(), _float_images(), iterations=2, sparsities=SPARSITIES, config=search_config(),
                   device="cpu", progress=False, distributed=False)
    return {"per_batch": ls, **per_sample, "prune": _summary(scores)}


def _assert_same_scores(got, want) -> None:
    assert sorted(got) == sorted(want)
    for b in want:
        assert torch.equal(got[b], want[b]), f"block {b}: max |diff| {float((got[b] - want[b]).abs().max()):.3g}"


# ----------------------------------------------------------------------------- tests
def test_split_gives_contiguous_unit_aligned_ranges():
    assert efd.split(4, 2) == [(0, 2), (2, 4)]
    assert efd.split(5, 2) == [(0, 3), (3, 5)]
    assert efd.split(30, 2, unit=4) == [(0, 16), (16, 30)]
    assert efd.split(3, 4) == [(0, 1), (1, 2), (2, 3), (3, 3)]
    assert efd.split(0, 3) == [(0, 0)] * 3
    for n, parts, unit in ((17, 3, 4), (9, 4, 2), (100, 7, 3)):
        ranges = efd.split(n, parts, unit)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % unit == 0 for lo, _ in ranges)


def test_a_single_process_context_runs_everything_locally(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = efd.current()
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1
    assert ctx.span(10, unit=4) == (0, 10)
    assert ctx.main_then_share(lambda: 5) == 5 and ctx.all_gather_object("x") == ["x"]
    out = torch.zeros(3)
    ctx.ordered_sum([torch.ones(3), torch.full((3,), 2.0)], out)
    assert torch.equal(out, torch.full((3,), 3.0))
    with pytest.raises(efd.DistributedError, match="torchrun"):
        efd.current(True)


def test_bad_timeout_and_incomplete_environment_are_refused(monkeypatch):
    monkeypatch.setenv(efd.ENV_TIMEOUT, "soon")
    with pytest.raises(efd.DistributedError, match="positive number of seconds"):
        efd.timeout_seconds()
    monkeypatch.setenv(efd.ENV_TIMEOUT, "12.5")
    assert efd.timeout_seconds() == 12.5
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(efd.DistributedError, match="MASTER_ADDR"):
        efd.current()


def test_sigterm_from_the_launcher_becomes_an_instructive_error():
    import signal
    import time

    previous = efd.raise_on_sigterm()
    try:
        with pytest.raises(efd.DistributedError, match="stopped by the launcher"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises as soon as the signal is delivered
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_every_rank_sees_the_launcher_world(ranks):
    assert [r["world_size"] for r in ranks] == [WORLD, WORLD]


def test_ordered_sum_adds_in_global_order_exactly_in_fp64(ranks):
    parts = _fp64_parts()
    sequential = torch.zeros(64, dtype=torch.float64)
    for p in parts:
        sequential += p
    for r in ranks:
        assert torch.equal(r["ordered_sum"], sequential)
    # summing each rank's half first and then the halves would NOT give the sequential result
    halves = torch.zeros(64, dtype=torch.float64) + sum(parts[:4]) + sum(parts[4:])
    assert not torch.equal(halves, sequential)


def test_distributed_dino_scores_equal_one_process_bit_for_bit(ranks, single):
    """7 uint8 images in batches of 2: rank 0 scores batches 0-1, rank 1 skips their crops and scores 2-3."""
    want = single["per_batch"]
    for r in ranks:
        heads, neurons, mean_loss, world = r["per_batch"]
        _assert_same_scores(heads, want.head_scores)
        _assert_same_scores(neurons, want.neuron_scores)
        assert mean_loss == want.config["mean_loss"] and world == WORLD
    assert "world_size" not in want.config


@pytest.mark.parametrize("kind", ["loop", "ghost"])
def test_distributed_per_sample_scores_equal_one_process(ranks, single, kind):
    """The loop calls the loss once per image (rank 1 skips crops image by image), ghost once per batch."""
    for r in ranks:
        heads, neurons = r[kind]
        _assert_same_scores(heads, single[kind].head_scores)
        _assert_same_scores(neurons, single[kind].neuron_scores)


def test_distributed_search_follows_the_single_process_trajectory(ranks, single):
    want = single["prune"]
    for r in ranks:
        got = r["prune"]
        assert np.array_equal(got["c"], want["c"])
        assert got["history"] == want["history"]  # every generation's best/mean/median, exactly
        assert got["best_fitness"] == want["best_fitness"] and got["mean_fitness"] == want["mean_fitness"]
        assert got["popsize"] == want["popsize"] == 10
        _assert_same_scores(got["head_sums"], want["head_sums"])


def test_only_rank_zero_writes_the_checkpoint(ranks):
    assert [r["wrote_checkpoint"] for r in ranks] == [True, False]


def test_an_error_on_one_rank_is_raised_on_every_rank(ranks):
    for r in ranks:
        assert r["all_or_nothing"] == ("DataError", "image 7 is unreadable (raised on rank 1)")
        assert r["main_then_share"] == ("DataError", "image 7 is unreadable (raised on rank 0)")


def test_ranks_with_different_weights_are_refused_on_every_rank(ranks):
    for r in ranks:
        kind, msg = r["other_weights"]
        assert kind == "DistributedError"
        assert "rank 1 holds different model weights than rank 0" in msg and "blocks.1.mlp.fc1.bias" in msg
        assert "torch.manual_seed" in msg


def test_a_dead_rank_stops_the_run_and_the_checkpoint_resumes_with_one_process(tmp_path, single, one_thread):
    out = tmp_path / "dead"
    payloads = _launch(_job_dead_rank, out)
    assert payloads[1]["error"] == "no result"  # rank 1 exited without a word
    err = payloads[0]
    assert err.get("error") == "DistributedError", err
    msg = err["message"]
    assert "stopped responding" in msg and "rank 1" in msg
    assert str(out / "ckpt" / CHECKPOINT_NAME) in msg and "after generation 1" in msg
    state = torch.load(out / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    assert len(state["history"]) == 1
    assert not [p.name for p in (out / "ckpt").iterdir() if p.name != CHECKPOINT_NAME]  # no temp files left
    # written by 2 ranks, resumed by 1: the uninterrupted single-process result
    resumed = prune(_model(), _float_images(), iterations=2, sparsities=SPARSITIES, config=search_config(),
                    checkpoint_dir=str(out / "ckpt"), resume=True, device="cpu", progress=False, distributed=False)
    got, want = _summary(resumed), single["prune"]
    assert np.array_equal(got["c"], want["c"]) and got["history"] == want["history"]
    assert got["best_fitness"] == want["best_fitness"]


def test_a_hanging_rank_stops_the_run_after_the_timeout(tmp_path):
    payloads = _launch(_job_hanging_rank, tmp_path / "hang", dist_timeout_s=6.0, only_rank0=True)
    kind, msg, seconds = payloads[0]["result"]
    assert kind == "DistributedError"
    assert "rank 1 stopped responding while evaluating candidates" in msg and "Timed out" in msg
    assert "no checkpoint is being written" in msg  # no checkpoint_dir was given
    assert seconds < 60
