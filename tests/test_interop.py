"""Reference score files: loaded without executing code, checked against a model layout."""

import dataclasses
import enum
import os
import subprocess
import sys
import types

import pytest
import torch

from elastic_fx.errors import BudgetError, ScoresError
from elastic_fx.interop import ReferenceObject, check_against, load_reference_scores, ratios_to_sparsity
from elastic_fx.structures import AttentionGroup, Block, MlpGroup, ParamSlice, StructureMap

L, HIDDEN, HEADS, HEAD_DIM, EMBED = 3, 16, 4, 8, 32


@pytest.fixture
def reference_package():
    """A stand-in for the reference's ``src.models.enums`` module, unregistered before loading."""
    names = ["src", "src.models", "src.models.enums", "src.inference"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["src"].models, mods["src"].inference = mods["src.models"], mods["src.inference"]
    mods["src.models"].enums = mods["src.models.enums"]

    class ModelType(str, enum.Enum):
        DINO_VIT_B_16 = "dino_vitb16"
        DEIT_3_VIT_S_16 = "deit-3-vit-s-16"

    class MLPArchitecture(str, enum.Enum):
        STANDARD = "standard"

    @dataclasses.dataclass
    class ElasticImportanceScores:
        mlp_scores: torch.Tensor
        head_scores: torch.Tensor
        model_type: ModelType
        num_blocks: int

    for cls, mod in ((ModelType, "src.models.enums"), (MLPArchitecture, "src.models.enums"),
                     (ElasticImportanceScores, "src.inference")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(mods)
    ns = types.SimpleNamespace(
        ModelType=ModelType, MLPArchitecture=MLPArchitecture, ElasticImportanceScores=ElasticImportanceScores
    )
    ns.forget = lambda: [sys.modules.pop(n, None) for n in names]
    yield ns
    for n, m in saved.items():
        if m is None:
            sys.modules.pop(n, None)
        else:
            sys.modules[n] = m


def _reference_dict(pkg, **overrides):
    g = torch.Generator().manual_seed(0)
    data = {
        "mlp_scores": torch.rand(L, HIDDEN, generator=g),
        "head_scores": torch.rand(L, HEADS, generator=g),
        "model_type": pkg.ModelType.DINO_VIT_B_16,
        "mlp_architecture": pkg.MLPArchitecture.STANDARD,
        "num_blocks": L,
        "hidden_dim": HIDDEN,
        "embed_dim": EMBED,
        "num_heads": HEADS,
        "head_dim": HEAD_DIM,
        "min_hidden_dim_keep_ratio": 0.05,
        "min_head_keep_ratio": 0.2,
        "metadata": {"seed": 42, "ga_loss_types": ["pca-cosine"], "ga_mlp_pruning_ratios": [0.15, 0.25]},
    }
    data.update(overrides)
    return data


def test_loads_a_reference_file_with_unknown_enums(tmp_path, reference_package):
    data = _reference_dict(reference_package)
    path = tmp_path / "dino_vitb16.pt"
    torch.save(data, path)
    with pytest.raises(Exception):  # the plain safe path cannot read it: the enums are unknown
        torch.load(path, weights_only=True)
    reference_package.forget()  # the reference code is not importable when we load

    ref = load_reference_scores(path)
    torch.testing.assert_close(ref.mlp_scores, data["mlp_scores"])
    torch.testing.assert_close(ref.head_scores, data["head_scores"])
    assert ref.mlp_scores.dtype == torch.float32
    assert (ref.num_blocks, ref.hidden_dim, ref.num_heads, ref.head_dim, ref.embed_dim) == (L, HIDDEN, HEADS, HEAD_DIM, EMBED)
    assert ref.model_type == "dino_vitb16" and ref.timm_model == "vit_base_patch16_224.dino"
    assert ref.mlp_architecture == "standard"
    assert ref.floors == {"neurons": 0.05, "heads": 0.2}
    assert ref.metadata["ga_mlp_pruning_ratios"] == [0.15, 0.25]
    assert set(ref.stand_ins) == {"src.models.enums.ModelType", "src.models.enums.MLPArchitecture"}
    assert "mlp_scores" in ref.raw_keys and "metadata" in ref.raw_keys


def test_loads_a_pickled_dataclass_instance(tmp_path, reference_package):
    pkg = reference_package
    obj = pkg.ElasticImportanceScores(torch.ones(L, HIDDEN), torch.ones(L, HEADS), pkg.ModelType.DEIT_3_VIT_S_16, L)
    torch.save(obj, tmp_path / "obj.pt")
    pkg.forget()
    ref = load_reference_scores(tmp_path / "obj.pt")
    assert ref.model_type == "deit-3-vit-s-16" and ref.num_blocks == L and ref.head_dim is None
    assert "src.inference.ElasticImportanceScores" in ref.stand_ins


def test_plain_files_and_ga_weight_dumps(tmp_path):
    torch.save({"mlp": torch.rand(L, HIDDEN), "head": torch.rand(L, HEADS)}, tmp_path / "ga.pt")
    ref = load_reference_scores(tmp_path / "ga.pt")
    assert (ref.num_blocks, ref.hidden_dim, ref.num_heads) == (L, HIDDEN, HEADS)
    assert ref.model_type is None and ref.floors is None and ref.stand_ins == ()


class _Payload:
    """Pickles as a call of ``func(*args)``: what a tampered score file would contain."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "make",
    [
        lambda p: (os.system, (f"echo pwned > {p}",)),
        lambda p: (exec, (f"open({str(p)!r}, 'w').write('pwned')",)),
        lambda p: (subprocess.call, (["touch", str(p)],)),
    ],
    ids=["os.system", "builtins.exec", "subprocess.call"],
)
def test_refuses_files_that_would_execute_code(tmp_path, make):
    marker = tmp_path / "pwned"
    func, args = make(marker)
    path = tmp_path / "evil.pt"
    torch.save({"mlp_scores": torch.rand(L, HIDDEN), "head_scores": torch.rand(L, HEADS), "x": _Payload(func, args)}, path)
    with pytest.raises(ScoresError, match="refusing to load .*could execute code"):
        load_reference_scores(path)
    assert not marker.exists()


def test_refused_global_is_named(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload(os.system, ("true",))}, path)
    with pytest.raises(ScoresError) as err:
        load_reference_scores(path)
    assert f"{os.system.__module__}.system" in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mlp_scores": torch.rand(L * HIDDEN)}, "float tensor \\[num_blocks, hidden_dim\\]"),
        ({"hidden_dim": HIDDEN * 2}, "hidden_dim=32 disagrees with mlp_scores \\[3, 16\\]"),
        ({"num_blocks": L + 1}, "num_blocks=4 disagrees"),
        ({"head_scores": torch.rand(L + 1, HEADS)}, "3 blocks but head_scores has 4"),
        ({"head_scores": torch.full((L, HEADS), float("nan"))}, "NaN"),
        ({"num_heads": "four"}, "positive integer"),
    ],
)
def test_inconsistent_files_are_refused(tmp_path, reference_package, overrides, message):
    torch.save(_reference_dict(reference_package, **overrides), tmp_path / "bad.pt")
    with pytest.raises(ScoresError, match=message):
        load_reference_scores(tmp_path / "bad.pt")


def test_unreadable_inputs(tmp_path):
    with pytest.raises(ScoresError, match="does not exist"):
        load_reference_scores(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(ScoresError, match="not a readable torch.save file"):
        load_reference_scores(tmp_path / "junk.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ScoresError, match="expected keys 'mlp_scores' and 'head_scores'"):
        load_reference_scores(tmp_path / "other.pt")


# ----------------------------------------------------------------------------- layout checks
def _vit_map(depth, embed, heads, hidden):
    """A StructureMap with the parameter ownership of a timm ViT (fused qkv, fc1/fc2)."""
    hd = embed // heads
    blocks = []
    for i in range(depth):
        p = f"blocks.{i}"
        head_rows = torch.stack([torch.cat([torch.arange(h * hd, (h + 1) * hd) + s * embed for s in range(3)])
                                 for h in range(heads)])
        head_cols = torch.arange(embed).view(heads, hd)
        attn = AttentionGroup(
            num_heads=heads, head_dim=hd, out_proj=f"{p}.attn.proj", in_projs=(f"{p}.attn.qkv",),
            slices=(ParamSlice(f"{p}.attn.qkv.weight", (3 * embed, embed), 0, head_rows),
                    ParamSlice(f"{p}.attn.qkv.bias", (3 * embed,), 0, head_rows),
                    ParamSlice(f"{p}.attn.proj.weight", (embed, embed), 1, head_cols)),
            num_tokens=197, num_kv_tokens=197, kind="sdpa",
        )
        neurons = torch.arange(hidden).view(hidden, 1)
        mlp = MlpGroup(
            hidden_features=hidden, out_proj=f"{p}.mlp.fc2", in_projs=(f"{p}.mlp.fc1",),
            slices=(ParamSlice(f"{p}.mlp.fc1.weight", (hidden, embed), 0, neurons),
                    ParamSlice(f"{p}.mlp.fc1.bias", (hidden,), 0, neurons),
                    ParamSlice(f"{p}.mlp.fc2.weight", (embed, hidden), 1, neurons)),
            num_tokens=197,
        )
        blocks.append(Block(index=i, attention=attn, mlp=mlp))
    prunable = depth * (heads * attn.params_per_head + hidden * mlp.params_per_neuron)
    return StructureMap(blocks=blocks, total_params=prunable + 1000, fixed_flops=0)


def test_check_against_names_the_first_mismatch(tmp_path, reference_package):
    torch.save(_reference_dict(reference_package), tmp_path / "s.pt")
    ref = load_reference_scores(tmp_path / "s.pt")
    check_against(ref, _vit_map(L, EMBED, HEADS, HIDDEN).describe())  # the matching model passes

    desc = _vit_map(L, EMBED, HEADS, HIDDEN).describe()
    desc[2]["hidden_features"] = 24
    with pytest.raises(ScoresError, match="block 2: hidden_features is 24 in the model but 16 in the score file"):
        check_against(ref, desc)
    with pytest.raises(ScoresError, match="block 0: num_heads is 2 .* dino_vitb16, timm model vit_base_patch16_224.dino"):
        check_against(ref, _vit_map(L, EMBED, 2, HIDDEN).describe())
    with pytest.raises(ScoresError, match="3 blocks .* but the model has 4 blocks"):
        check_against(ref, _vit_map(L + 1, EMBED, HEADS, HIDDEN).describe())


def test_ratios_to_sparsity_for_vit_b():
    smap = _vit_map(12, 768, 12, 3072)
    neuron, head = 768 + 1 + 768, 3 * 64 * 768 + 3 * 64 + 64 * 768
    n_params, h_params = 12 * 3072 * neuron, 12 * 12 * head
    expected = (0.35 * n_params + 0.2 * h_params) / (n_params + h_params)
    assert ratios_to_sparsity(0.35, 0.2, smap) == pytest.approx(expected, rel=1e-12)
    assert ratios_to_sparsity(0.35, 0.2, smap) == pytest.approx(0.300, abs=5e-4)  # the docstring's figure
    # independent route: a keep mask removing 25 % of neurons and of heads in every block
    keep = {i: {"heads": list(range(9)), "neurons": list(range(2304))} for i in range(12)}
    assert ratios_to_sparsity(0.25, 0.25, smap) == pytest.approx(smap.sparsity(keep), rel=1e-12)
    assert ratios_to_sparsity(0.0, 0.0, smap) == 0.0
    with pytest.raises(BudgetError, match="mlp_ratio"):
        ratios_to_sparsity(1.5, 0.2, smap)


def test_stand_in_is_inert():
    cls = type("ModelType", (ReferenceObject,), {"ref_path": "src.models.enums.ModelType"})
    member = cls("dino_vitb16")
    assert member.value == "dino_vitb16" and "src.models.enums.ModelType" in repr(member)


def test_refuses_a_raw_pickle_attack(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "raw.pkl"  # not a torch zip checkpoint: no static scan, weights_only decides
    with open(path, "wb") as f:
        pickle.dump({"x": _Payload(os.system, (f"echo pwned > {marker}",))}, f, protocol=2)
    with pytest.raises(ScoresError, match="refusing to load .*could execute code"):
        load_reference_scores(path)
    assert not marker.exists()


FACTORY = """
import timm

def model():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                             embed_dim=32, num_heads=4, mlp_ratio=0.5, num_classes=0)
"""


def test_import_scores_command_maps_a_reference_file_onto_the_model(tmp_path, reference_package):
    """elastic-fx import-scores: reference file -> .efx whose ranking follows the reference's scores."""
    import elastic_fx as efx
    from elastic_fx.cli import main

    (tmp_path / "m.py").write_text(FACTORY)
    spec = f"{tmp_path / 'm.py'}:model"
    data = _reference_dict(reference_package)
    torch.save(data, tmp_path / "ref.pt")
    reference_package.forget()
    out = tmp_path / "imported.efx"
    assert main(["import-scores", str(tmp_path / "ref.pt"), "--model", spec, "--out", str(out)]) == 0
    gm = efx.trace(__import__("elastic_fx").models.load_model(spec), (torch.randn(2, 3, 32, 32),))
    smap = efx.discover(gm)
    scores = efx.ElasticScores.load(out, smap)
    # the head the reference scored lowest in block 0 is the first head to go
    keep = scores.keep(smap, 0.05)
    assert torch.equal(scores.head_means[0].float(), data["head_scores"][0])
    lowest_neuron = int(torch.argmin(data["mlp_scores"][0]))
    keep_hi = efx.budget_masks(smap, *scores.scores(), mlp_ratio=0.25, head_ratio=0.25, floors=scores.floors)
    assert lowest_neuron not in keep_hi[0]["neurons"]
    assert len(keep) == L


def test_import_scores_refuses_a_mismatched_model(tmp_path, reference_package, capsys):
    from elastic_fx.cli import main

    (tmp_path / "m.py").write_text(FACTORY.replace("num_heads=4", "num_heads=2"))
    torch.save(_reference_dict(reference_package), tmp_path / "ref.pt")
    reference_package.forget()
    rc = main(["import-scores", str(tmp_path / "ref.pt"), "--model", f"{tmp_path / 'm.py'}:model",
               "--out", str(tmp_path / "x.efx")])
    assert rc == 1 and "block 0" in capsys.readouterr().err
    assert not (tmp_path / "x.efx").exists()
