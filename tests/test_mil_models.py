"""The tile-based MIL baselines: shapes, attention, permutation invariance, losses, learning, Nyström attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsilocal.errors import ConfigError
from wsilocal.models.mil import MIL_MODELS, MILModel, build_mil_model
from wsilocal.models.mil.clam import smooth_top1_svm_loss
from wsilocal.models.mil.transmil import iterative_pinv, nystrom_attention, segment_means

IN_DIM = 512
# Every model with the class counts it supports.
CASES = [(name, n) for name in MIL_MODELS for n in (2, 3) if not (MIL_MODELS[name].binary_only and n != 2)]
CASE_IDS = [f"{name}-{n}" for name, n in CASES]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(name: str, n_classes: int, seed: int = 0) -> MILModel:
    torch.manual_seed(seed)
    return build_mil_model(name, n_classes, IN_DIM)


def synthetic_bags(n_classes: int, n_bags: int = 12, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Bags of 20–60 Gaussian instances; in a bag of class c > 0 a few instances are shifted along axis c."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n_bags):
        label = i % n_classes
        features = rng.normal(size=(int(rng.integers(20, 61)), IN_DIM)).astype(np.float32)
        if label > 0:
            positives = rng.choice(len(features), size=int(rng.integers(3, 7)), replace=False)
            features[positives, label] += 5.0
        bags.append((torch.from_numpy(features), torch.tensor([label])))
    return bags


def train_accuracy(model: MILModel, bags) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int(model(x).logits.argmax(dim=1)) == int(y) for x, y in bags)
    return correct / len(bags)


def fit(model: MILModel, bags, max_epochs: int, seed: int = 0) -> int:
    """Train one bag per step with the stage's default optimiser; return the epochs until 100 % accuracy."""
    optimizer = model.make_optimizer()
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, max_epochs + 1):
        model.train()
        for i in torch.randperm(len(bags), generator=generator).tolist():
            x, y = bags[i]
            loss = model.loss(model(x), y, x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if train_accuracy(model, bags) == 1.0:
            return epoch
    return max_epochs + 1


@pytest.mark.parametrize(("name", "n_classes"), CASES, ids=CASE_IDS)
def test_output_shapes_and_attention(name, n_classes):
    model = make_model(name, n_classes).eval()
    for n in (1, 7, 100):
        out = model(torch.randn(n, IN_DIM))
        assert out.logits.shape == (1, n_classes)
        assert torch.isfinite(out.logits).all()
        if out.instance_logits is not None:
            assert out.instance_logits.shape == (n, n_classes)
        if name == "transmil":
            assert out.attention is None
            continue
        assert out.attention.shape == (n,)
        if model.attention_is_softmax:
            assert torch.all(out.attention >= 0)
            torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))
        else:  # a per-tile probability
            assert torch.all((out.attention >= 0) & (out.attention <= 1))


def test_attention_kinds_are_declared():
    softmax = {name for name, model in MIL_MODELS.items() if model.attention_is_softmax}
    assert softmax == {"abmil", "gabmil", "dsmil", "clam_sb", "clam_mb"}
    order_dependent = {name for name, model in MIL_MODELS.items() if not model.permutation_invariant}
    assert order_dependent == {"transmil"}  # PPEG and the residual conv see token order


@pytest.mark.parametrize(("name", "n_classes"), CASES, ids=CASE_IDS)
def test_permutation_invariance(name, n_classes):
    model = make_model(name, n_classes)
    if name == "milrnn":
        model.set_stage("rnn")  # the RNN sees the top-k tiles ordered by score, so it is invariant too
    model.eval()
    features = torch.randn(50, IN_DIM)
    permutation = torch.randperm(50)
    with torch.no_grad():
        out, shuffled = model(features), model(features[permutation])
    if model.permutation_invariant:
        torch.testing.assert_close(shuffled.logits, out.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shuffled.attention, out.attention[permutation], atol=1e-6, rtol=1e-5)
    else:
        assert not torch.allclose(shuffled.logits, out.logits, atol=1e-5)


@pytest.mark.parametrize(("name", "n_classes"), CASES, ids=CASE_IDS)
def test_loss_backpropagates_into_every_parameter(name, n_classes):
    model = make_model(name, n_classes)
    features = torch.randn(100, IN_DIM)
    reached = set()
    for stage in model.training_stages:
        model.set_stage(stage)
        model.train()
        model.zero_grad()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        loss = model.loss(model(features), torch.tensor([n_classes - 1]), features)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        for param_name, param in model.named_parameters():
            if param_name in trainable:
                assert param.grad is not None and torch.isfinite(param.grad).all(), f"{stage}: {param_name}"
                assert param.grad.abs().sum() > 0, f"{stage}: no gradient reaches {param_name}"
            else:
                assert param.grad is None, f"{stage}: frozen {param_name} got a gradient"
        reached |= trainable
    assert reached == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize(("name", "n_classes"), CASES, ids=CASE_IDS)
def test_overfits_small_bag_set_with_default_optimiser(name, n_classes):
    model = make_model(name, n_classes)
    bags = synthetic_bags(n_classes)
    for stage in model.training_stages:
        model.set_stage(stage)
        assert fit(model, bags, max_epochs=30) <= 30, f"{name} stage {stage} did not reach 100 % in 30 epochs"
    assert train_accuracy(model, bags) == 1.0


def test_milrnn_stages_freeze_and_switch_optimiser():
    model = make_model("milrnn", 2)
    assert model.training_stages == ["instance", "rnn"]
    assert model.make_optimizer().__class__ is torch.optim.Adam
    model.set_stage("rnn")
    optimizer = model.make_optimizer()
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1 / 128, 0.9, True, 1e-4)
    assert {id(p) for p in group["params"]} == {id(p) for n, p in model.named_parameters() if n.startswith("rnn_")}
    model.train()
    assert not model.instance_classifier.training  # the tile classifier is a fixed embedder for the RNN
    # The stage travels with the weights.
    restored = make_model("milrnn", 2, seed=1)
    restored.load_state_dict(model.state_dict())
    assert restored.stage == "rnn"
    x = torch.randn(30, IN_DIM)
    torch.testing.assert_close(restored.eval()(x).logits, model.eval()(x).logits)


def test_milrnn_instance_stage_predicts_with_the_top_tile():
    model = make_model("milrnn", 2).eval()
    x = torch.randn(40, IN_DIM)
    out = model(x)
    top = int(torch.softmax(out.instance_logits, dim=1)[:, 1].argmax())
    torch.testing.assert_close(out.logits, out.instance_logits[top : top + 1])


def test_dsmil_loss_is_half_bag_half_max_instance():
    model = make_model("dsmil", 3).eval()
    x, y = torch.randn(25, IN_DIM), torch.tensor([2])
    out = model(x)
    max_instance = out.instance_logits.max(dim=0).values
    expected = 0.5 * torch.nn.functional.cross_entropy(out.logits, y) + 0.5 * torch.nn.functional.cross_entropy(
        max_instance[None], y)
    torch.testing.assert_close(model.loss(out, y, x), expected)
    # The attention is the softmax of query similarities to the predicted class's critical instance.
    predicted = int(out.logits.argmax())
    queries = model.query(x)
    critical = int(out.instance_logits[:, predicted].argmax())
    torch.testing.assert_close(out.attention, torch.softmax(queries @ queries[critical] / 128**0.5, dim=0))


def test_smooth_top1_svm_matches_its_definition():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.7], [-3.0, 4.0]])
    target = torch.tensor([0, 0, 1])
    # τ·log Σ_j exp((s_j + α[j≠y] − s_y)/τ), α = τ = 1, averaged.
    expected = np.mean([np.log(np.exp(0.0) + np.exp(-1 + 1 - 2)), np.log(np.exp(0.0) + np.exp(0.7 + 1 - 0.5)),
                        np.log(np.exp(-3 + 1 - 4) + np.exp(0.0))])
    assert float(smooth_top1_svm_loss(logits, target)) == pytest.approx(expected, rel=1e-6)


def test_clam_loss_mixes_bag_and_clustering_terms():
    model = make_model("clam_sb", 2).eval()
    x, y = torch.randn(40, IN_DIM), torch.tensor([1])
    out = model(x)
    h, attention = out.extras["embedded"], out.attention
    top, bottom = attention.topk(8).indices, (-attention).topk(8).indices
    in_class = smooth_top1_svm_loss(model.instance_classifiers[1](h[torch.cat([top, bottom])]),
                                    torch.tensor([1] * 8 + [0] * 8))
    out_class = smooth_top1_svm_loss(model.instance_classifiers[0](h[top]), torch.zeros(8, dtype=torch.long))
    expected = 0.7 * torch.nn.functional.cross_entropy(out.logits, y) + 0.3 * (in_class + out_class) / 2
    torch.testing.assert_close(model.loss(out, y, x), expected)
    # One-instance bags have no in-class term (an instance cannot be its own negative) but still train.
    single = torch.randn(1, IN_DIM)
    assert torch.isfinite(model.loss(model(single), y, single))


def test_clam_mb_attention_is_the_predicted_class_branch():
    model = make_model("clam_mb", 3).eval()
    out = model(torch.randn(30, IN_DIM))
    torch.testing.assert_close(out.attention, out.extras["attention"][int(out.logits.argmax())])


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    matrix = torch.softmax(torch.randn(3, 12, 12, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(iterative_pinv(matrix, 30), torch.linalg.pinv(matrix), atol=1e-8, rtol=1e-6)


def test_nystrom_attention_approximates_softmax_attention():
    torch.manual_seed(0)
    n, d = 40, 64
    q, k = (torch.randn(2, 8, n, d, dtype=torch.float64) / d**0.25 for _ in range(2))
    v = torch.randn(2, 8, n, d, dtype=torch.float64)
    exact = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    # One landmark per token: exact once the pseudo-inverse has converged ...
    torch.testing.assert_close(nystrom_attention(q, k, v, landmarks=n, pinv_iterations=25), exact, atol=1e-6, rtol=0)
    # ... and close with the paper's 6 iterations; more landmarks than tokens fall back to one per token.
    assert (nystrom_attention(q, k, v, landmarks=256, pinv_iterations=6) - exact).abs().max() < 0.1


def test_landmarks_are_segment_means():
    x = torch.randn(2, 3, 12, 5)
    torch.testing.assert_close(segment_means(x, 4), x.reshape(2, 3, 4, 3, 5).mean(dim=3))
    torch.testing.assert_close(segment_means(x, 12), x)


def test_transmil_pads_bag_to_a_square_and_uses_the_class_token():
    model = make_model("transmil", 2).eval()
    seen = []
    model.position.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    model(torch.randn(7, IN_DIM))
    assert seen == [torch.Size([1, 1 + 9, 512])]  # 7 tiles → 3×3 map + class token


def test_unknown_model_and_binary_only_errors():
    with pytest.raises(ConfigError) as error:
        build_mil_model("attnmil", 2)
    assert str(error.value) == ("unknown MIL model 'attnmil'; choose one of: maxpool, meanpool, abmil, gabmil, "
                                "dsmil, clam_sb, clam_mb, milrnn, transmil")
    with pytest.raises(ConfigError) as error:
        build_mil_model("milrnn", 3)
    assert str(error.value) == ("milrnn: MIL-RNN (Campanella et al. 2019) is defined for binary tasks only; "
                                "got 3 classes")
    with pytest.raises(ConfigError, match=r"^clam_sb: unknown option\(s\) k_samples; known: "):
        build_mil_model("clam_sb", 2, k_samples=4)
    with pytest.raises(ConfigError, match=r"^abmil: unknown training stage 'rnn' \(stages: main\)$"):
        build_mil_model("abmil", 2).set_stage("rnn")
    with pytest.raises(ValueError, match=r"^gabmil: expected one bag of shape \(N, 512\) with N >= 1, got \(0, 512\)$"):
        build_mil_model("gabmil", 2)(torch.zeros(0, IN_DIM))


def test_default_optimisers_follow_the_published_recipes():
    expected = {"maxpool": ("adam", 2e-4, 1e-5), "meanpool": ("adam", 2e-4, 1e-5), "abmil": ("adam", 5e-4, 1e-4),
                "gabmil": ("adam", 5e-4, 1e-4), "dsmil": ("adam", 2e-4, 5e-3), "clam_sb": ("adam", 2e-4, 1e-5),
                "clam_mb": ("adam", 2e-4, 1e-5), "milrnn": ("adam", 1e-4, 1e-4), "transmil": ("radam", 2e-4, 1e-5)}
    for name, model_class in MIL_MODELS.items():
        settings = model_class.default_optim
        assert (settings["optimizer"], settings["lr"], settings["weight_decay"]) == expected[name]
    optimizer = make_model("dsmil", 2).make_optimizer(lr=1e-3)
    assert optimizer.param_groups[0]["betas"] == (0.5, 0.9) and optimizer.param_groups[0]["lr"] == 1e-3


def test_class_weights_weight_the_bag_loss():
    torch.manual_seed(0)
    model = build_mil_model("abmil", 2, class_weights=[1.0, 3.0]).eval()
    x, y = torch.randn(10, IN_DIM), torch.tensor([1])
    out = model(x)
    # One bag per step: the weight must scale the loss (a weighted mean over one bag would cancel it).
    torch.testing.assert_close(model.loss(out, y, x), 3.0 * torch.nn.functional.cross_entropy(out.logits, y))
    torch.testing.assert_close(model.loss(out, torch.tensor([0]), x),
                               torch.nn.functional.cross_entropy(out.logits, torch.tensor([0])))
    assert "class_weights" not in model.state_dict()
