"""Score-file fuzzing: truncation, bit flips and JSON tampering end in a clean ScoresError.

Every damaged file either loads into scores that still give keep-masks, or is refused with
:class:`ScoresError` -- never a JSONDecodeError, KeyError, TypeError, ValueError ... from
inside the loader, and never a report that crashes on a wrongly typed field.
"""

import copy
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import elastic_fx as efx
from elastic_fx.errors import ElasticFxError
from elastic_fx.scores import SCORES_FORMAT
from elastic_fx.scoring.local import local_scores


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from zoo import build

    model, inputs = build("timm_vit")
    gm = efx.trace(model, inputs)
    smap = efx.discover(gm)
    local = local_scores(gm, None, method="magnitude", structures=smap, progress=False)
    scores = efx.ElasticScores.from_local(local, smap)
    scores.c = np.random.default_rng(0).uniform(0.5, 1.5, scores.layout.dim)
    scores.sparsities = (0.3, 0.5)
    scores.history = [{"generation": 0, "best": 0.5, "mean": 0.4, "median": 0.4, "best_so_far": 0.5,
                       "seconds": 0.1}]
    scores.best_fitness, scores.mean_fitness = 0.5, 0.4
    scores.preprocess = {"input_size": [32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                         "interpolation": "bicubic", "crop_pct": 0.875}
    path = scores.save(tmp_path_factory.mktemp("fuzz") / "good.efx")
    return path, smap


def _parts(path):
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return meta, tensors


def _outcome(path, smap):
    """'ok' (loaded, gives masks, a report can be written) or 'refused' (ScoresError); anything else fails."""
    try:
        scores = efx.ElasticScores.load(path, smap)
    except efx.ScoresError as e:
        assert "\n" not in str(e).strip(), f"a multi-line error: {e}"
        return "refused"
    try:
        scores.keep(smap, 0.3)
    except ElasticFxError:
        pass
    return "ok"


def test_the_untouched_file_loads(saved):
    path, smap = saved
    assert _outcome(path, smap) == "ok"


def test_truncation_is_refused(saved, tmp_path):
    path, smap = saved
    data = path.read_bytes()
    cuts = sorted(set([0, 1, 7, 8, 9, 50, len(data) // 2, len(data) - 1]
                      + random.Random(0).sample(range(len(data)), 40)))
    for n in cuts:
        bad = tmp_path / f"cut{n}.efx"
        bad.write_bytes(data[:n])
        assert _outcome(bad, smap) == "refused", f"a file cut at {n} of {len(data)} bytes loaded"


def test_bit_flips_load_or_are_refused(saved, tmp_path):
    path, smap = saved
    data = bytearray(path.read_bytes())
    rng = random.Random(1)
    outcomes = []
    for i in range(300):
        flipped = bytearray(data)
        pos = rng.randrange(len(flipped))
        flipped[pos] ^= 1 << rng.randrange(8)
        bad = tmp_path / "flip.efx"
        bad.write_bytes(bytes(flipped))
        outcomes.append(_outcome(bad, smap))  # raises on anything but ok / ScoresError
    assert "refused" in outcomes


def _rewrite(path, out, edit_meta=None, edit_tensors=None, raw_json=None):
    header, tensors = _parts(path)
    meta = json.loads(header[SCORES_FORMAT])
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    header[SCORES_FORMAT] = raw_json if raw_json is not None else json.dumps(meta)
    save_file(tensors, str(out), metadata=header)
    return out


def _set(path_keys, value):
    def edit(meta):
        d = meta
        for k in path_keys[:-1]:
            d = d[k]
        d[path_keys[-1]] = value
    return edit


def _delete(path_keys):
    def edit(meta):
        d = meta
        for k in path_keys[:-1]:
            d = d[k]
        del d[path_keys[-1]]
    return edit


NAMED_TAMPERING = {
    "invalid JSON": dict(raw_json="{not json"),
    "a JSON array": dict(raw_json="[1, 2, 3]"),
    "a JSON string": dict(raw_json='"scores"'),
    "no layout": dict(edit_meta=_delete(["search", "layout"])),
    "unknown floors key": dict(edit_meta=_set(["search", "floors", "bogus"], 1)),
    "layout head_blocks lie": dict(edit_meta=lambda m: m["search"]["layout"]["head_blocks"].append([99, 3])),
    "layout ffn_blocks lie": dict(edit_meta=lambda m: m["search"]["layout"].update(ffn_blocks=[])),
    "c too short": dict(edit_tensors=lambda t: t.update(c=t["c"][:-1].clone())),
    "c missing": dict(edit_tensors=lambda t: t.pop("c")),
    "c inf": dict(edit_tensors=lambda t: t.update(c=torch.full_like(t["c"], float("inf")))),
    "short score tensor": dict(edit_tensors=lambda t: t.update({"head_scores.0": t["head_scores.0"][:-1].clone()})),
    "inf scores": dict(edit_tensors=lambda t: t.update({"head_scores.0": torch.full_like(t["head_scores.0"],
                                                                                         float("inf"))})),
    "a stray head_means.x tensor": dict(edit_tensors=lambda t: t.update({"head_means.x": torch.zeros(2)})),
    "a stray head_scores.x tensor": dict(edit_tensors=lambda t: t.update({"head_scores.x": torch.zeros(2)})),
    "integer score tensor": dict(edit_tensors=lambda t: t.update({"head_scores.0": t["head_scores.0"].long()})),
    "block index not a number": dict(edit_meta=lambda m: m["blocks"][0].update(index="x")),
    "duplicate block": dict(edit_meta=lambda m: m["blocks"].append(copy.deepcopy(m["blocks"][0]))),
    "no blocks": dict(edit_meta=_set(["blocks"], [])),
    "unknown preprocess key": dict(edit_meta=_set(["search", "preprocess", "bogus"], 1)),
    "negative input size": dict(edit_meta=_set(["search", "preprocess", "input_size"], [-1, 32])),
    "unknown ranking": dict(edit_meta=_set(["search", "ranking"], "sideways")),
    "a future version": dict(edit_meta=_set(["version"], 99)),
}


@pytest.mark.parametrize("name", sorted(NAMED_TAMPERING))
def test_named_tampering_is_refused(name, saved, tmp_path):
    path, smap = saved
    bad = _rewrite(path, tmp_path / "bad.efx", **NAMED_TAMPERING[name])
    assert _outcome(bad, smap) == "refused"


#: Every field, top level and search section, set to values of the wrong type.
WRONG_VALUES = [None, "x", [], {}, -1, 1.5, True, [None], {"a": None}]
TOP_KEYS = ["version", "method", "loss", "mode", "num_images", "fingerprint", "blocks", "config"]
SEARCH_KEYS = ["elastic_fx_version", "layout", "sparsities", "floors", "ranking", "head_offset", "history",
               "best_fitness", "mean_fitness", "selection", "preprocess", "config"]


@pytest.mark.parametrize("where", [("top", k) for k in TOP_KEYS] + [("search", k) for k in SEARCH_KEYS]
                         + [("search",)], ids=lambda w: ".".join(w))
def test_wrongly_typed_fields_load_or_are_refused(where, saved, tmp_path):
    path, smap = saved
    keys = list(where[1:]) if where[0] == "top" else list(where)
    for value in WRONG_VALUES:
        bad = _rewrite(path, tmp_path / "typed.efx", edit_meta=_set(keys, value))
        outcome = _outcome(bad, smap)
        if outcome == "ok":  # what loaded must also report without crashing
            from elastic_fx.report import write_report

            write_report(efx.ElasticScores.load(bad, smap), smap, tmp_path / "rep", title="fuzz")


def test_block_description_fields_wrongly_typed(saved, tmp_path):
    path, smap = saved
    header, _ = _parts(path)
    block_keys = sorted(json.loads(header[SCORES_FORMAT])["blocks"][0])
    for key in block_keys:
        for value in WRONG_VALUES:
            bad = _rewrite(path, tmp_path / "b.efx", edit_meta=lambda m, k=key, v=value: m["blocks"][0].update({k: v}))
            _outcome(bad, smap)
