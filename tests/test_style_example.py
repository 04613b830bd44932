"""The ten-line program of ../shared/STYLE.md runs as written (a small random ViT, tensor images)."""

import timm
import torch

import elastic_fx as efx


def test_the_ten_line_example_runs_as_written(tmp_path):
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=48, num_heads=3, num_classes=0).eval()
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gm = efx.trace(model, (calib[:2],))
    structures = efx.discover(gm)
    print(structures.summary())
    config = efx.SearchConfig(num_images=8, num_fitness_images=16, batch_size=4)
    scores = efx.prune(gm, calib, structures=structures, iterations=1, sparsities=(0.1, 0.3, 0.5, 0.6),
                       config=config, progress=False)
    scores.save(tmp_path / "vit_s.efx")
    small = efx.ElasticModel(gm, scores).at(sparsity=0.4)  # a physically smaller GraphModule
    report = efx.exporters.export_onnx(small, tmp_path / "vit_s_40.onnx")  # checked against onnxruntime
    assert report.max_abs_diff < 1e-3 and (tmp_path / "vit_s_40.onnx").is_file()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in gm.parameters())
    # the StructureMap handed in is the one used, not found again
    assert efx.ElasticModel(gm, scores).smap is structures
