"""Attention heads, auxiliary classifiers, random feature reconstruction and the auxiliary model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wsilocal.models.heads import AuxiliaryClassifier, FinalClassifier, GatedAttentionPool, aux_kernel_size
from wsilocal.models.local_net import AuxiliaryModel
from wsilocal.models.rfr import (
    RandomFeatureReconstruction,
    crop_patches,
    fitting_patch_size,
    rfr_patch_size,
    sample_patch_boxes,
)
from wsilocal.models.split import BlockBoundaries, balanced_split, module_specs

# --- gated attention and classifiers ----------------------------------------------------------------


def test_gated_attention_matches_a_direct_computation():
    torch.manual_seed(1)
    pool = GatedAttentionPool(16, 8, dropout=0.5).eval()
    x = torch.randn(1, 16, 5, 7)
    with torch.no_grad():
        pooled, attention = pool(x)
    assert pooled.shape == (1, 16) and attention.shape == (5, 7)
    h = x[0].reshape(16, 35).t()
    V, U, w = pool.V[0], pool.U[0], pool.w
    scores = (torch.tanh(h @ V.weight.t() + V.bias) * torch.sigmoid(h @ U.weight.t() + U.bias)) @ w.weight.t() + w.bias
    expected_attention = torch.softmax(scores[:, 0], 0)
    torch.testing.assert_close(attention.flatten(), expected_attention)
    torch.testing.assert_close(pooled[0], expected_attention @ h)
    assert float(attention.sum()) == pytest.approx(1.0, abs=1e-6) and float(attention.min()) > 0
    with pytest.raises(ValueError, match=r"expected one feature map of shape \(1, C, H, W\), got \(2, 16, 5, 7\)"):
        pool(torch.randn(2, 16, 5, 7))


def test_attention_dropout_acts_only_in_training():
    torch.manual_seed(2)
    pool = GatedAttentionPool(32, 16, dropout=0.5)
    x = torch.randn(1, 32, 6, 6)
    assert not torch.equal(pool(x)[1], pool(x)[1])  # training: two dropout draws differ
    pool.eval()
    assert torch.equal(pool(x)[1], pool(x)[1])


@pytest.mark.parametrize("channels, kernel", [(64, 9), (128, 7), (256, 5), (512, 3)])
@pytest.mark.parametrize("hw", [(20, 31), (2, 3), (1, 1)])
def test_auxiliary_classifier_shapes_and_full_coverage(channels, kernel, hw):
    torch.manual_seed(3)
    classifier = AuxiliaryClassifier(channels, 3).eval()
    assert aux_kernel_size(channels) == kernel == classifier.conv.kernel_size[0] == classifier.conv.stride[0]
    x = torch.randn(1, channels, *hw, requires_grad=True)
    logits, attention = classifier(x)
    windows = (math.ceil(hw[0] / kernel), math.ceil(hw[1] / kernel))
    assert logits.shape == (1, 3) and attention.shape == windows
    assert float(attention.detach().sum()) == pytest.approx(1.0, abs=1e-5)
    # The padded strided conv equals explicit zero padding to a multiple of k, with every pixel inside a window.
    pad_h, pad_w = (windows[0] * kernel - hw[0]), (windows[1] * kernel - hw[1])
    padded = F.pad(x, (math.ceil(pad_w / 2), pad_w // 2, math.ceil(pad_h / 2), pad_h // 2))
    reference = F.conv2d(padded, classifier.conv.weight, classifier.conv.bias, stride=kernel)
    pooled, _ = classifier.pool(F.relu(classifier.norm(reference)))
    torch.testing.assert_close(logits, classifier.classifier(pooled))
    logits.sum().backward()
    assert (x.grad.abs().sum(dim=1) > 0).all()  # no row or column of the map is dropped


def test_unknown_channel_count_is_refused():
    with pytest.raises(ValueError, match=r"no auxiliary-classifier kernel for 96 channels"):
        AuxiliaryClassifier(96, 2)


def test_final_classifier():
    torch.manual_seed(4)
    head = FinalClassifier(512, 4).eval()
    logits, attention = head(torch.randn(1, 512, 3, 5))
    assert logits.shape == (1, 4) and attention.shape == (3, 5)
    assert float(attention.detach().sum()) == pytest.approx(1.0, abs=1e-6)
    assert head.pool.w.in_features == 128 and head.classifier[0].out_features == 128


# --- RFR patch sizes and crop correspondence -----------------------------------------------------------


def test_patch_sizes_of_the_presets(trunk):
    def sizes(k):
        return [rfr_patch_size(spec.out_stride) for spec in module_specs(trunk, k)[:-1]]

    assert sizes(4) == [128, 64, 32]
    assert sizes(8) == [128, 128, 128, 64, 64, 32, 32]
    assert sizes(2) == [64]


def test_method_doc_states_the_patch_size_rule_the_code_follows(trunk):
    """docs/method.md: the patch size follows the module's *output* stride. Read by the input stride, module 2 of
    K=4 (input at stride 6, output at 12) would get 128 instead of the 64 the code gives it."""
    doc = " ".join((Path(__file__).parents[1] / "docs" / "method.md").read_text().split())
    specs = module_specs(trunk, 4)[:-1]
    assert [(s.in_stride, s.out_stride) for s in specs] == [(1, 6), (6, 12), (12, 24)]
    assert [rfr_patch_size(s.out_stride) for s in specs] == [128, 64, 32]
    assert "follows the stride of the module's *output* relative to the image" in doc
    assert "128 where the output is at stride ≤ 6, 64 at stride ≤ 12, 32 beyond (K=4: 128, 64, 32; K=8: 128, " \
           "128, 128, 64, 64, 32, 32)" in doc
    assert "input is at stride" not in doc


IMAGE_HW = (200, 168)


def _splits(trunk):
    return [4, 8, BlockBoundaries([2, 5, 7, 12, 15]), balanced_split(trunk, 4, IMAGE_HW)]


def test_crops_correspond_spatially_for_every_split(trunk):
    """With an average-pooling 'module' of the same stride, every output patch is exactly the pooled
    input patch — on the real map sizes the trunk produces at this image size."""
    with torch.no_grad():
        maps = [torch.zeros(1, 3, *IMAGE_HW)]
        for block in trunk.blocks():
            maps.append(block(maps[-1]))
    generator = torch.Generator().manual_seed(5)
    checked = 0
    for split in _splits(trunk):
        for spec in module_specs(trunk, split)[:-1]:
            in_hw, out_hw = tuple(maps[spec.first_block].shape[2:]), tuple(maps[spec.stop_block].shape[2:])
            x_in = torch.randn(1, 4, *in_hw, generator=generator)
            x_out = F.avg_pool2d(x_in, spec.stride, ceil_mode=True)
            assert tuple(x_out.shape[2:]) == out_hw
            patch = rfr_patch_size(spec.out_stride)
            boxes = sample_patch_boxes(out_hw, in_hw, spec.stride, patch, 10, generator)
            size = min(math.ceil(patch / spec.stride), out_hw[0], out_hw[1],
                       in_hw[0] // spec.stride, in_hw[1] // spec.stride)
            assert len(boxes) == 10 and all(b.out_size == size for b in boxes)
            for b in boxes:
                assert 0 <= b.out_y and b.out_y + b.out_size <= out_hw[0] and b.in_y + b.in_size <= in_hw[0]
                assert 0 <= b.out_x and b.out_x + b.out_size <= out_hw[1] and b.in_x + b.in_size <= in_hw[1]
            in_patches, out_patches = crop_patches(x_in, x_out, boxes)
            assert in_patches.shape == (10, 4, size * spec.stride, size * spec.stride)
            torch.testing.assert_close(F.avg_pool2d(in_patches, spec.stride), out_patches)
            checked += 1
    assert checked == 3 + 7 + 5 + 3


def test_patch_locations_cover_the_map_and_are_reproducible():
    boxes = sample_patch_boxes((10, 12), (20, 24), 2, 8, 2000, torch.Generator().manual_seed(0))
    assert {b.out_y for b in boxes} == set(range(10 - 4 + 1)) and {b.out_x for b in boxes} == set(range(12 - 4 + 1))
    again = sample_patch_boxes((10, 12), (20, 24), 2, 8, 2000, torch.Generator().manual_seed(0))
    assert boxes == again


def test_patch_shrinks_to_small_maps_and_refuses_empty_ones():
    assert fitting_patch_size((40, 40), (80, 80), 2, 64) == 32
    assert fitting_patch_size((5, 9), (10, 17), 2, 64) == 5
    assert fitting_patch_size((3, 3), (5, 5), 2, 64) == 2  # the input holds only 2 whole windows
    with pytest.raises(ValueError, match=r"feature maps too small for RFR: output \(1, 1\), input \(1, 1\), stride 2"):
        fitting_patch_size((1, 1), (1, 1), 2, 64)


# --- RFR unit ------------------------------------------------------------------------------------------


def test_rfr_loss_is_finite_reproducible_and_trains_only_the_output_side():
    torch.manual_seed(6)
    rfr = RandomFeatureReconstruction(c_in=64, c_out=128, stride=2, patch_size=16, n_patches=4)
    assert [type(m).__name__ for m in rfr.decoder] == ["Upsample", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    x_in = torch.randn(1, 64, 30, 26, requires_grad=True)
    x_out = torch.randn(1, 128, 15, 13, requires_grad=True)
    loss = rfr(x_in, x_out, torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    again = rfr(x_in, x_out, torch.Generator().manual_seed(1))
    assert float(again.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    loss.backward()
    assert x_in.grad is None  # the target is detached
    assert x_out.grad is not None and x_out.grad.abs().sum() > 0
    # The loss is the L1 distance of the decoded output patches to the input patches.
    boxes = sample_patch_boxes((15, 13), (30, 26), 2, 16, 4, torch.Generator().manual_seed(1))
    targets, sources = crop_patches(x_in.detach(), x_out.detach(), boxes)
    with torch.no_grad():
        expected = (rfr.decoder(sources) - targets).abs().mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_rfr_decoder_learns_a_fixed_pair():
    torch.manual_seed(7)
    rfr = RandomFeatureReconstruction(c_in=8, c_out=16, stride=1, patch_size=12, n_patches=10)
    assert "Upsample" not in [type(m).__name__ for m in rfr.decoder]
    x_in = torch.randn(1, 8, 24, 24)
    x_out = torch.cat([x_in, -x_in], dim=1)  # the input is recoverable from the output
    optimizer = torch.optim.Adam(rfr.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = rfr(x_in, x_out, torch.Generator().manual_seed(0))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


# --- the auxiliary model G_i -----------------------------------------------------------------------------


def test_auxiliary_model_losses(trunk):
    torch.manual_seed(8)
    spec = module_specs(trunk, 4)[1]  # [U3, U4]: 64 → 128 channels, stride 2, output at 1/12
    model = AuxiliaryModel(spec, n_classes=3, rfr_patches=3)
    assert model.classifier.kernel == 7 and model.rfr.patch_size == 64 and model.rfr.n_patches == 3
    x_in, x_out = torch.randn(1, 64, 40, 36), torch.randn(1, 128, 20, 18, requires_grad=True)
    y = torch.tensor([2])
    losses = model(x_in, x_out, y, torch.Generator().manual_seed(0))
    assert set(losses) == {"cls", "rfr", "total", "logits"} and losses["logits"].shape == (1, 3)
    torch.testing.assert_close(losses["cls"], F.cross_entropy(losses["logits"], y))
    torch.testing.assert_close(losses["total"], losses["cls"] + losses["rfr"])
    assert float(losses["rfr"].detach()) > 0
    without = AuxiliaryModel(spec, n_classes=3, rfr=False)
    plain = without(x_in, x_out, y)
    assert without.rfr is None and float(plain["rfr"]) == 0 and torch.equal(plain["total"], plain["cls"])


def test_slide_cross_entropy_applies_the_class_weight_to_a_single_slide():
    from wsilocal.models.heads import slide_cross_entropy

    logits = torch.tensor([[0.3, -1.2, 2.0]])
    weight = torch.tensor([0.5, 3.0, 1.5])
    for label in range(3):
        target = torch.tensor([label])
        plain = torch.nn.functional.cross_entropy(logits, target)
        assert torch.allclose(slide_cross_entropy(logits, target), plain)
        assert torch.allclose(slide_cross_entropy(logits, target, weight), plain * weight[label])
        # the reason for the helper: torch's weighted mean over one sample cancels the weight
        assert torch.allclose(torch.nn.functional.cross_entropy(logits, target, weight=weight), plain)


def test_context_block_reads_no_glass_position_and_the_paper_head_keeps_its_names():
    torch.manual_seed(0)
    head = FinalClassifier(32, 3, context=8).eval()
    x = torch.randn(1, 32, 9, 11)
    mask = torch.zeros(9, 11, dtype=torch.bool)
    mask[2:7, 3:9] = True
    noisy = torch.where(mask, x, torch.randn_like(x) * 100)  # what glass cells hold does not matter
    logits, attention = head(x, mask)
    again, attention_again = head(noisy, mask)
    torch.testing.assert_close(logits, again, rtol=0, atol=1e-6)
    assert torch.equal(attention == 0, ~mask) and torch.allclose(attention, attention_again, atol=1e-7)
    assert not torch.equal(head(noisy)[0], logits)  # without the mask the glass cells are read
    assert {k.split(".")[0] for k in FinalClassifier(32, 3).state_dict()} == {"pool", "classifier"}
    assert head.instances(x, mask).shape == (1, 8, 9, 11)
