"""DINO multi-crop sampling and the self-distillation loss."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from elastic_fx.data import PreprocessConfig, SyntheticSource
from elastic_fx.errors import ConfigError, DataError
from elastic_fx.scoring.dino import DinoConfig, DinoLoss, MultiCropSampler, ce_loss, dino_loss

CFG = PreprocessConfig((16, 16), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _images(b=3, size=40, seed=0):
    return SyntheticSource(b, size=size, seed=seed).tensor()


# --------------------------------------------------------------------------- crops


def test_every_view_of_every_image_differs():
    # The same image repeated: views can only differ because each (view, image) pair
    # draws its own crop box -- the reference samples one box per batch.
    img = _images(1)
    batch = img.expand(4, -1, -1, -1).contiguous()
    g, loc = MultiCropSampler(CFG, DinoConfig(), seed=0)(batch)
    assert g.shape == (2, 4, 3, 16, 16) and loc.shape == (10, 4, 3, 16, 16)
    views = torch.cat([g, loc]).flatten(0, 1)  # [48, 3, 16, 16]
    for a, b in itertools.combinations(range(views.shape[0]), 2):
        assert not torch.allclose(views[a], views[b], atol=1e-3), (a, b)


def test_crop_boxes_follow_the_scale_and_ratio_ranges():
    sampler = MultiCropSampler(CFG, DinoConfig(), seed=1)
    sizes = [(200, 300), (150, 150), (90, 400)]
    for scale in [(0.25, 1.0), (0.05, 0.25)]:
        boxes = sampler.boxes(sizes, scale, 64)  # [64, 3, 4]
        hw = torch.tensor(sizes, dtype=torch.float64)
        top, left, h, w = boxes.unbind(-1)
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= hw[:, 0]).all() and (left + w <= hw[:, 1]).all()
        frac = (h * w).double() / (hw[:, 0] * hw[:, 1])
        # rounding h and w to pixels moves the area a little; the fallback crop is larger
        within = (frac > scale[0] * 0.9) & (frac < scale[1] * 1.1)
        assert within.float().mean() > 0.95
        ratio = (w.double() / h.double())[within]
        assert (ratio > 0.7).all() and (ratio < 1.45).all()
        # independent boxes (the wide image's large crops often fall back to one centre crop)
        assert len({tuple(b) for b in boxes.reshape(-1, 4).tolist()}) > 100


def test_sampler_is_deterministic_for_a_seed():
    imgs = _images(2)
    a = MultiCropSampler(CFG, DinoConfig(n_local=3), seed=5)
    b = MultiCropSampler(CFG, DinoConfig(n_local=3), seed=5)
    ga, la = a(imgs)
    gb, lb = b(imgs)
    assert torch.equal(ga, gb) and torch.equal(la, lb)
    ga2, _ = a(imgs)  # the generator advances: the next batch gets new crops
    assert not torch.equal(ga, ga2)
    gc, _ = MultiCropSampler(CFG, DinoConfig(n_local=3), seed=6)(imgs)
    assert not torch.equal(ga, gc)


def test_sampler_normalises_uint8_once_and_not_float_input():
    flat = torch.full((1, 3, 30, 30), 255, dtype=torch.uint8)
    flat[:, 1] = 0
    g, loc = MultiCropSampler(CFG, DinoConfig(n_local=2), seed=0)(flat)
    expected = (torch.tensor([1.0, 0.0, 1.0]) - torch.tensor(CFG.mean)) / torch.tensor(CFG.std)
    torch.testing.assert_close(g[0, 0].mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    # an already-normalised float image is cropped but not normalised again
    pre = expected.view(1, 3, 1, 1).expand(1, 3, 30, 30).contiguous()
    g2, _ = MultiCropSampler(CFG, DinoConfig(n_local=2), seed=0)(pre)
    torch.testing.assert_close(g2[0, 0].mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)


def test_sampler_accepts_pil_list_of_mixed_sizes():
    imgs = [SyntheticSource(1, size=s, seed=s).load(0) for s in (24, 64)]
    g, loc = MultiCropSampler(CFG, DinoConfig(n_local=1), seed=0)(imgs)
    assert g.shape == (2, 2, 3, 16, 16) and loc.shape == (1, 2, 3, 16, 16)
    with pytest.raises(DataError):
        MultiCropSampler(CFG)(torch.zeros(2, 1, 8, 8))


# --------------------------------------------------------------------------- loss


def _reference_loss(z: torch.Tensor, G: int, tt: float, ts: float) -> torch.Tensor:
    """Loop form: z [V, B, D] raw embeddings; teacher = detached global views."""
    z = F.normalize(z, dim=-1)
    total, pairs = 0.0, 0
    for k in range(G):
        p_t = torch.softmax(z[k].detach() / tt, dim=-1)
        for m in range(z.shape[0]):
            if m == k:
                continue
            total = total + (-(p_t * torch.log_softmax(z[m] / ts, dim=-1)).sum(-1)).mean()
            pairs += 1
    return total / pairs


def test_identical_teacher_and_student_view_gives_zero_gradient_and_teacher_entropy():
    torch.manual_seed(0)
    view = torch.randn(1, 4, 3, 4, 4)
    weight = torch.randn(48, 24, requires_grad=True)

    def embed(x):
        return x.flatten(1) @ weight

    # One global (teacher) view and one local (student) view that is the same image.
    loss = dino_loss(embed, view, view.clone(), DinoConfig(n_global=1, n_local=1))
    loss.backward()
    p_t = torch.softmax(F.normalize(embed(view[0]).detach(), dim=-1), dim=-1)
    entropy = -(p_t * p_t.log()).sum(-1).mean()
    torch.testing.assert_close(loss.detach(), entropy, atol=1e-6, rtol=1e-6)
    assert weight.grad.abs().max() < 1e-6

    # Control: different temperatures make the same pair disagree -> real gradient.
    weight.grad = None
    dino_loss(embed, view, view.clone(), DinoConfig(n_global=1, n_local=1, teacher_temp=0.1)).backward()
    assert weight.grad.abs().max() > 1e-3


@pytest.mark.parametrize("tt,ts", [(1.0, 1.0), (0.04, 0.1)])
def test_loss_matches_loop_reference_value_and_gradient(tt, ts):
    torch.manual_seed(1)
    G, L, B = 2, 3, 5
    g, loc = torch.randn(G, B, 3, 4, 4), torch.randn(L, B, 3, 4, 4)
    w1 = torch.randn(48, 16, requires_grad=True)
    cfg = DinoConfig(n_global=G, n_local=L, teacher_temp=tt, student_temp=ts)
    calls = []

    def embed(x):
        calls.append(x.shape[0])
        return torch.tanh(x.flatten(1) @ w1)

    loss = dino_loss(embed, g, loc, cfg)
    assert calls == [(G + L) * B]  # one batched student call, teacher reuses it
    (grad,) = torch.autograd.grad(loss, w1)

    z = embed(torch.cat([g, loc]).flatten(0, 1)).view(G + L, B, -1)
    ref = _reference_loss(z, G, tt, ts)
    (ref_grad,) = torch.autograd.grad(ref, w1, retain_graph=True)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-4)

    # The teacher is detached: letting gradient through the teacher changes the gradient.
    zn = F.normalize(z, dim=-1)
    p_t = torch.softmax(zn[:G] / tt, dim=-1)
    log_p_s = torch.log_softmax(zn / ts, dim=-1)
    ce = -torch.einsum("kbd,mbd->kmb", p_t, log_p_s)
    mask = ~torch.eye(G, G + L, dtype=torch.bool)
    (undetached,) = torch.autograd.grad(ce[mask].mean(), w1)
    assert not torch.allclose(undetached, grad, atol=1e-6)


def test_separate_teacher_gets_no_gradient():
    torch.manual_seed(2)
    g, loc = torch.randn(2, 3, 3, 4, 4), torch.randn(4, 3, 3, 4, 4)
    student = torch.nn.Linear(48, 8)
    teacher = torch.nn.Linear(48, 8)
    loss = dino_loss(lambda x: student(x.flatten(1)), g, loc, DinoConfig(n_local=4),
                     teacher_fn=lambda x: teacher(x.flatten(1)))
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None


def test_dino_loss_shape_errors():
    g = torch.randn(2, 1, 3, 4, 4)
    with pytest.raises(DataError, match="pooled embeddings"):
        dino_loss(lambda x: x, g, torch.randn(1, 1, 3, 4, 4))  # returns [M, 3, 4, 4]
    with pytest.raises(DataError, match="views"):
        dino_loss(lambda x: x.flatten(1), g, torch.randn(1, 1, 3, 8, 8))
    with pytest.raises(ConfigError):
        DinoConfig(local_scale=(0.3, 0.2))
    with pytest.raises(ConfigError):
        DinoConfig(teacher_temp=0.0)


def test_dino_loss_fn_runs_model_in_eval_mode_and_restores_mode():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9), torch.nn.Linear(3 * 16 * 16, 8))
    model.train()
    imgs = _images(2, size=24)
    loss_a = DinoLoss(MultiCropSampler(CFG, DinoConfig(n_local=2), seed=0))(model, imgs)
    loss_b = DinoLoss(MultiCropSampler(CFG, DinoConfig(n_local=2), seed=0))(model, imgs)
    assert model.training  # restored
    torch.testing.assert_close(loss_a, loss_b)  # no dropout noise: eval mode inside
    loss_a.backward()
    assert model[2].weight.grad.abs().sum() > 0


def test_ce_loss_with_labels():
    logits_w = torch.randn(12, 4, requires_grad=True)
    x = torch.randn(3, 12)
    labels = torch.tensor([0, 3, 1])
    loss = ce_loss(lambda t: t @ logits_w, x, labels)
    torch.testing.assert_close(loss, F.cross_entropy(x @ logits_w, labels))
    with pytest.raises(DataError, match="labels"):
        ce_loss(lambda t: t @ logits_w, x, torch.tensor([0, 4, 1]))
