"""Glass left out of the attention (``mask_glass``): the tissue mask of an image and of each map's positions, the
masked attention pools, and the same masks on the whole-image and the streamed paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsilocal.models.heads import AuxiliaryClassifier, FinalClassifier
from wsilocal.models.local_net import LocalNet
from wsilocal.models.resnet import Stem
from wsilocal.slide.tissue import ImageTissueMask, TissueRegion, image_tissue_mask
from wsilocal.stream.bands import band_forward, block_input_lengths, stream_along_longer_side
from wsilocal.stream.geometry import (
    block_geometry,
    footprint,
    map_cells,
    module_tissue_positions,
    pull_back,
    tissue_positions,
)
from wsilocal.stream.sources import ArraySource, TensorSource
from wsilocal.train.data import Augmentation, CachedSlides
from wsilocal.train.local_step import forward_all_classifiers, local_training_step
from wsilocal.train.streaming import (
    streaming_end_to_end_step,
    streaming_forward_all_classifiers,
    streaming_local_step,
)
from wsilocal.train.trainer import evaluate_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEAN, STD = [0.7, 0.55, 0.7], [0.2, 0.25, 0.2]
N_CLASSES, LABEL = 3, 1
FLOAT64_RTOL = 1e-10


def banded_tissue(height: int, width: int) -> ImageTissueMask:
    """A tissue mask with a glass band across the image, glass on the left and a hole: an overview of 1/8 the
    image's resolution, each image pixel taking the overview pixel under it."""
    h0, w0 = -(-height // 8), -(-width // 8)
    overview = np.ones((h0, w0), bool)
    overview[h0 // 3 : h0 // 3 + max(1, h0 // 6)] = False  # a band of glass across
    overview[:, : max(1, w0 // 4)] = False  # glass on the left
    overview[2 * h0 // 3 : 2 * h0 // 3 + 2, w0 // 2 : w0 // 2 + 2] = False  # a hole
    rows = (np.arange(height) // 8).astype(np.int32)
    cols = (np.arange(width) // 8).astype(np.int32)
    return ImageTissueMask(overview, rows, cols)


def reference_grid(pixels: np.ndarray, stride: int, offsets: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Position (i, j) is tissue when any pixel of its cell is (cells tile the image; outer ones reach its edges);
    ``offsets``: of the rows' and the columns' cells."""
    def edges(n_cells: int, length: int, offset: int) -> list[int]:
        inner = [min(max(o * stride + offset, 0), length) for o in range(1, n_cells)]
        return [0, *inner, length]

    rows, cols = (edges(n, length, offset) for n, length, offset in zip(shape, pixels.shape, offsets, strict=True))
    grid = np.array([[pixels[rows[i] : rows[i + 1], cols[j] : cols[j + 1]].any() for j in range(shape[1])]
                     for i in range(shape[0])])
    return grid if grid.any() else np.ones(shape, bool)


# --- the masks ------------------------------------------------------------------------------------------


def test_image_mask_samples_the_overview_under_each_pixel_centre():
    rng = np.random.default_rng(0)
    mask = rng.random((40, 30)) < 0.5
    region = TissueRegion(mask, 16.0, (100, 64, 200, 150), float(mask.mean()))
    slide_size = (480, 640)  # level-0 (width, height): 16 level-0 px per overview pixel
    tissue = image_tissue_mask(region, slide_size, (50, 37))
    assert tissue.shape == (37, 50)
    expected = np.zeros((37, 50), bool)
    for y in range(37):
        for x in range(50):
            level0 = (100 + (x + 0.5) * 200 / 50, 64 + (y + 0.5) * 150 / 37)
            expected[y, x] = mask[int(level0[1] // 16), int(level0[0] // 16)]
    np.testing.assert_array_equal(tissue.pixels(), expected)
    assert tissue.overview.size < mask.size  # only the part under the box is kept


@pytest.mark.parametrize("stride, offset, shape", [(6, -3, (9, 7)), (48, -24, (2, 2)), (12, -6, (5, 4)),
                                                   (7, 0, (8, 6))])
def test_grid_marks_the_cells_that_hold_tissue(stride, offset, shape):
    tissue = banded_tissue(50, 40).flip(1).rot90(1).flip(0)  # reversed index arrays, transposed overview
    expected = reference_grid(tissue.pixels(), stride, (offset, offset), shape)
    np.testing.assert_array_equal(tissue.grid(stride, offset, shape), expected)


def test_grid_without_tissue_attends_to_everything():
    tissue = ImageTissueMask(np.zeros((3, 3), bool), np.arange(24) // 8, np.arange(24) // 8)
    assert tissue.grid(6, -3, (4, 4)).all()


class _Entry:
    """A cache entry whose image shows its own tissue mask (tissue white, glass black)."""

    def __init__(self, tissue: ImageTissueMask):
        self.slide_id, self.source = "s", "s.svs"
        self.height, self.width = tissue.shape
        self._tissue = tissue

    def image(self) -> np.ndarray:
        return np.repeat(self._tissue.pixels()[..., None], 3, axis=2).astype(np.uint8) * 255

    def tissue(self) -> ImageTissueMask:
        return self._tissue


@pytest.mark.parametrize("epoch", range(6))
def test_augmented_sample_and_its_mask_are_transformed_alike(epoch):
    tissue = banded_tissue(61, 45)
    samples = CachedSlides([_Entry(tissue)], [0], [0.0] * 3, [1.0] * 3, Augmentation(color_jitter=0.0), seed=3,
                           mask_glass=True)
    image, _, _ = samples.get(0, epoch)
    np.testing.assert_array_equal(samples.tissue(0, epoch).pixels(), image[0, 0].numpy() > 0.5)
    assert CachedSlides([_Entry(tissue)], [0], [0.0] * 3, [1.0] * 3).tissue(0) is None  # mask_glass off


def test_auxiliary_grid_mask_is_the_pooled_map_mask():
    """The conv output's mask (max-pooled from its input map's) equals the grid of the conv windows' own cells."""
    tissue = banded_tissue(300, 260)
    net = LocalNet(N_CLASSES, 4, rfr=False)
    masks = module_tissue_positions(net.stages, tissue)
    for i, aux in enumerate(net.aux):
        blocks = [b for stage in net.stages[: i + 1] for b in stage]
        stride, offset = map_cells(blocks)
        hw = tuple(masks[i].shape)
        np.testing.assert_array_equal(masks[i].numpy(), reference_grid(tissue.pixels(), stride, (offset, offset), hw))
        pooled = aux.classifier.output_mask(masks[i], hw)
        k, padding = aux.classifier.kernel, aux.classifier.padding(hw)
        offsets = (offset - padding[0] * stride, offset - padding[1] * stride)
        expected = reference_grid(tissue.pixels(), stride * k, offsets, tuple(pooled.shape))
        np.testing.assert_array_equal(pooled.numpy(), expected)
        assert not pooled.all() and pooled.any()


# --- the pools ------------------------------------------------------------------------------------------


def _map_and_mask(channels: int, hw: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *hw, dtype=torch.float64, generator=generator)
    mask = torch.rand(hw, generator=generator) < 0.6
    return x, mask


def test_final_classifier_attends_only_to_tissue():
    torch.manual_seed(0)
    head = FinalClassifier(16, N_CLASSES, hidden=8).double().eval()
    x, mask = _map_and_mask(16, (5, 7))
    logits, attention = head(x, mask)
    assert (attention[~mask] == 0).all() and (attention[mask] > 0).all()
    assert float(attention.detach().sum()) == pytest.approx(1.0, abs=1e-14)
    # Reference: softmax of the gated scores over the tissue positions alone, pooled by hand.
    h = x[0].permute(1, 2, 0)[mask]  # (n, C)
    pool = head.pool
    scores = pool.w(torch.tanh(pool.V[0](h)) * torch.sigmoid(pool.U[0](h)))[:, 0]
    weights = torch.softmax(scores, 0)
    torch.testing.assert_close(logits, head.classifier((weights @ h)[None]), rtol=1e-13, atol=0)
    torch.testing.assert_close(attention[mask], weights, rtol=1e-13, atol=0)
    # What lies on the glass cannot change the result, and with every position tissue nothing changes.
    changed = x.clone()
    changed[0][:, ~mask] = 1e6
    assert torch.equal(head(changed, mask)[0], logits)
    torch.testing.assert_close(head(x, torch.ones(5, 7, dtype=torch.bool))[0], head(x)[0], rtol=1e-13, atol=0)


def test_auxiliary_classifier_leaves_glass_out_of_groupnorm_and_attention():
    torch.manual_seed(0)
    aux = AuxiliaryClassifier(64, N_CLASSES).double().eval()
    x = torch.randn(1, 64, 3, 4, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False], [True, True, False, True]])
    logits, attention = aux.head(x, mask)
    assert (attention[~mask] == 0).all()
    # Reference: GroupNorm with the statistics of the tissue positions, then attention over them.
    tokens = x[0][:, mask]  # (C, n)
    groups = tokens.reshape(aux.norm.num_groups, -1)
    normed = ((groups - groups.mean(1, keepdim=True)) / torch.sqrt(groups.var(1, unbiased=False, keepdim=True)
                                                                   + aux.norm.eps)).reshape(64, -1)
    h = F.relu(normed * aux.norm.weight[:, None] + aux.norm.bias[:, None]).t()
    pooled, weights = aux.pool.pool_instances(h)
    torch.testing.assert_close(logits, aux.classifier(pooled), rtol=1e-13, atol=0)
    changed = x.clone()
    changed[0][:, ~mask] = -50.0
    assert torch.equal(aux.head(changed, mask)[0], logits)
    everything = torch.ones(3, 4, dtype=torch.bool)
    torch.testing.assert_close(aux.head(x, everything)[0], aux.head(x)[0], rtol=1e-12, atol=0)


# --- whole image and streamed: the same masks, the same results ----------------------------------------


def make_net(split, *, rfr: bool = True) -> LocalNet:
    torch.manual_seed(0)
    return LocalNet(N_CLASSES, split, rfr=rfr, rfr_patches=3).double().train()


def make_source(height: int, width: int) -> ArraySource:
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return ArraySource(image, MEAN, STD)


def whole(source: ArraySource) -> torch.Tensor:
    return source.read(0, 0, source.height, source.width).double()


def gradients(net: LocalNet) -> dict[str, torch.Tensor]:
    result = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return result


def assert_close_gradients(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Relative error ≤ 1e-10 per parameter, beside a floor of 1e-13 of the largest gradient: some gradients are
    zero in exact arithmetic (the attention scores' bias: softmax ignores a common shift) and hold only noise."""
    assert got.keys() == reference.keys()
    top = max(float(g.norm()) for g in reference.values())
    for name, g in reference.items():
        assert float((got[name] - g).norm()) <= FLOAT64_RTOL * float(g.norm()) + 1e-13 * top, name


@pytest.mark.parametrize("k, hw, tile", [(4, (300, 260), (64, 64, 192, 4096)), (2, (157, 131), 40)],
                         ids=["K4-square", "K2-awkward"])
def test_streamed_local_step_masks_as_the_whole_image_step(k, hw, tile):
    net, source = make_net(k), make_source(*hw)
    tissue = banded_tissue(*hw)
    torch.manual_seed(5)
    plain = local_training_step(net, whole(source), LABEL, tissue=tissue,
                                generator=torch.Generator().manual_seed(1))
    reference = gradients(net)
    torch.manual_seed(5)
    streamed = streaming_local_step(net, source, LABEL, tissue=tissue, tile=tile,
                                    generator=torch.Generator().manual_seed(1))
    assert streamed.cls_losses == pytest.approx(plain.cls_losses, rel=1e-12)
    for a, b in zip(streamed.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert_close_gradients(gradients(net), reference)
    # The mask matters: without it the logits differ.
    torch.manual_seed(5)
    unmasked = local_training_step(net, whole(source), LABEL, generator=torch.Generator().manual_seed(1))
    net.zero_grad(set_to_none=True)
    assert not torch.allclose(unmasked.logits[-1], plain.logits[-1], rtol=1e-6, atol=0)


def test_streamed_end_to_end_step_masks_as_the_whole_image_step():
    net, source = make_net(1), make_source(300, 200)
    tissue = banded_tissue(300, 200)
    mask = module_tissue_positions(net.stages, tissue)[-1]
    torch.manual_seed(7)
    logits, attention = net.head(net.trunk(whole(source)), mask)
    F.cross_entropy(logits, torch.tensor([LABEL])).backward()
    reference = gradients(net)
    assert (attention[~mask] == 0).all() and not mask.all()
    torch.manual_seed(7)
    result = streaming_end_to_end_step(net, source, LABEL, tissue=tissue, tile=96, store="memory")
    torch.testing.assert_close(result.logits[0], logits.detach(), rtol=1e-12, atol=0)
    assert_close_gradients(gradients(net), reference)


def test_streamed_evaluation_masks_as_the_whole_image_forward():
    net = make_net(4).eval()
    source, tissue = make_source(300, 260), banded_tissue(300, 260)
    plain = forward_all_classifiers(net, whole(source), tissue=tissue)
    streamed = streaming_forward_all_classifiers(net, source, tissue=tissue, tile=64)
    for a, b in zip(streamed, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    unmasked = forward_all_classifiers(net, whole(source))
    assert all(not torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(unmasked, plain, strict=True))


class _Samples:
    """The part of CachedSlides that evaluate_samples uses, with tissue masks."""

    def __init__(self, sources, tissues, labels):
        self.sources, self.tissues, self.labels = sources, tissues, labels

    def __len__(self) -> int:
        return len(self.sources)

    def get(self, index: int):
        return whole(self.sources[index]).float(), self.labels[index], f"slide{index}"

    def tissue(self, index: int):
        return self.tissues[index]


def test_evaluate_samples_gives_the_same_masked_probabilities_whole_or_streamed():
    torch.manual_seed(0)
    net = LocalNet(N_CLASSES, 4, rfr=False).eval()
    hw = (300, 260)
    samples = _Samples([make_source(*hw)], [banded_tissue(*hw)], [LABEL])
    plain = evaluate_samples(net, samples, torch.device("cpu"))
    streamed = evaluate_samples(net, samples, torch.device("cpu"), memory_budget=1, stream_tile=64)
    assert streamed["streamed_slides"] == 1
    np.testing.assert_allclose(streamed["probabilities"], plain["probabilities"], rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = forward_all_classifiers(net, whole(samples.sources[0]).float(), tissue=samples.tissues[0])[-1]
    np.testing.assert_allclose(plain["probabilities"][0], torch.softmax(expected, 1)[0].numpy(), rtol=1e-6)


# --- glass skipped in the band engine -------------------------------------------------------------------


def test_pull_back_marks_every_input_some_needed_output_depends_on():
    rng = np.random.default_rng(1)
    geometry = [(3, 2, 1), (3, 1, 1)]  # S = 2, footprint [-3, 3]
    needed = rng.random((6, 5)) < 0.2
    got = pull_back(needed, geometry, (11, 9))
    stride, first, last = footprint(geometry)
    expected = np.zeros((11, 9), bool)
    for o_y, o_x in zip(*np.nonzero(needed), strict=True):
        expected[max(0, o_y * stride + first) : o_y * stride + last + 1,
                 max(0, o_x * stride + first) : o_x * stride + last + 1] = True
    np.testing.assert_array_equal(got, expected)


def _trunk_macs(blocks, run) -> int:
    """Multiply-accumulates of the trunk's convolutions while ``run()`` runs: each block's output positions
    computed times its convolutions' weights per output position (the stem's conv1 runs at 4 positions each)."""
    total = [0]

    def hook(per_position: int):
        def count(_module, _inputs, output):
            total[0] += output.shape[2] * output.shape[3] * per_position
        return count

    handles = []
    for block in blocks:
        convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
        per_position = sum(c.weight.numel() for c in convs) * (4 if isinstance(block, Stem) else 1)
        handles.append(block.register_forward_hook(hook(per_position)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def test_band_engine_computes_the_needed_positions_exactly_and_little_else():
    """A few blocks, so that footprints are small beside the map: a sparse set of needed positions (columns cut
    into segments, windows with nothing needed) is computed exactly, with a fraction of the work."""
    net = make_net(4).eval()
    blocks = net.trunk.blocks()[:3]
    source = make_source(300, 260)
    with torch.no_grad():
        reference = torch.nn.Sequential(*blocks)(whole(source))
    needed = np.zeros(reference.shape[2:], bool)
    needed[5:12, 3:9] = True  # a block of tissue
    needed[30:33, 20:42] = True  # a strip, far from it
    needed[40, 10] = True  # a lone cell
    with torch.no_grad():
        full = _trunk_macs(blocks, lambda: band_forward(blocks, source, band=4))
        part = _trunk_macs(blocks, lambda: band_forward(blocks, source, band=4, needed=needed))
        got = band_forward(blocks, source, band=4, needed=needed)
    scale = float(reference.abs().max())
    assert float((got - reference)[..., torch.from_numpy(needed)].abs().max()) <= 1e-13 * scale
    assert part < 0.5 * full, (part, full)


@pytest.mark.parametrize("hw", [(2100, 64), (64, 2100)], ids=["tall", "wide"])
def test_skipping_glass_in_the_band_engine_changes_no_logit(hw):
    """ResNet18 (a 649-px receptive field) on a thin image whose middle third is glass: the glass further than a
    halo from the tissue is not computed, and H's logits and attention are those of the whole-image forward."""
    torch.manual_seed(0)
    net = LocalNet(N_CLASSES, 4, rfr=False, arch="resnet18").double().eval()
    blocks = net.trunk.blocks()
    source = make_source(*hw)
    long_side = max(hw)
    glass = np.zeros(long_side // 8 + 1, bool)
    glass[long_side // 24 : 2 * long_side // 24] = True  # a third of the overview's length
    overview = ~glass[:, None] if hw[0] > hw[1] else ~glass[None, :]
    along = (np.arange(long_side) // 8).astype(np.int32)
    across = np.zeros(min(hw), np.int32)
    tissue = (ImageTissueMask(overview, along, across) if hw[0] > hw[1] else ImageTissueMask(overview, across, along))
    final_hw = tuple(block_input_lengths(blocks, n)[-1] for n in hw)
    mask = tissue_positions(blocks, tissue, final_hw)
    assert mask.any() and not mask.all()
    with torch.no_grad():
        whole_map = net.trunk(whole(source))
        skipped = stream_along_longer_side(blocks, source, band=4, needed=mask.numpy())
        scale = float(whole_map.abs().max())
        assert float((skipped - whole_map)[..., mask].abs().max()) <= 1e-13 * scale
        logits, attention = net.head(skipped, mask)
        expected_logits, expected_attention = net.head(whole_map, mask)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-12, atol=0)
    torch.testing.assert_close(attention, expected_attention, rtol=1e-12, atol=0)
    assert (attention[~mask] == 0).all()
    if hw[0] > hw[1]:  # the wide image runs on the engine's transposed copies of the blocks, which no hook sees
        with torch.no_grad():
            full = _trunk_macs(blocks, lambda: band_forward(blocks, source, band=4))
            part = _trunk_macs(blocks, lambda: band_forward(blocks, source, band=4, needed=mask.numpy()))
        # ~10 % of the MACs go at band 4 (where window edges fall, relative to the glass, moves it by a few %).
        assert part < 0.92 * full, (part, full)


class _RecordingSource:
    """A :class:`TensorSource` that records every window read and the pixels it covered."""

    def __init__(self, tensor: torch.Tensor):
        self.inner = TensorSource(tensor)
        self.height, self.width = self.inner.height, self.inner.width
        self.read_mask = np.zeros((self.height, self.width), bool)

    def read(self, top, left, height, width):
        self.read_mask[top : top + height, left : left + width] = True
        return self.inner.read(top, left, height, width)


def test_band_engine_reads_only_the_columns_needed_positions_look_at():
    """Glass skipped, the image is read only in column segments that hold the footprints of the needed outputs
    (every pixel a needed output depends on is read, most glass is not), and the needed outputs stay exact."""
    net = make_net(4).eval()
    blocks = net.trunk.blocks()[:3]
    image = whole(make_source(300, 260))
    with torch.no_grad():
        reference = torch.nn.Sequential(*blocks)(image)
    needed = np.zeros(reference.shape[2:], bool)
    needed[5:12, 3:9] = True
    needed[30:33, 28:42] = True
    source = _RecordingSource(image)
    with torch.no_grad():
        got = band_forward(blocks, source, band=4, needed=needed)
    scale = float(reference.abs().max())
    assert float((got - reference)[..., torch.from_numpy(needed)].abs().max()) <= 1e-13 * scale
    depends_on = pull_back(needed, block_geometry(blocks), (image.shape[2], image.shape[3]))
    assert source.read_mask[depends_on].all()
    assert source.read_mask.mean() < 0.6, source.read_mask.mean()
    # Rows whose band holds no needed output are not read at all.
    assert not source.read_mask[-40:].any()
