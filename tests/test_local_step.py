"""The locally supervised step: gradient isolation, K=1 = end-to-end, frozen BatchNorm."""

import pytest
import torch
import torch.nn.functional as F

from wsilocal.models.local_net import LocalNet
from wsilocal.train.local_step import forward_all_classifiers, local_training_step

torch.set_num_threads(2)


def make_net(split, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = LocalNet(3, split, rfr_patches=3, **kwargs)
    net.train()
    for m in net.modules():  # dropout off, so two computations of the same loss agree exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return net


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("split", [4, 8])
def test_each_module_gets_gradient_from_its_own_loss_only(split):
    net = make_net(split)
    image = torch.randn(1, 3, 160, 192)
    local_training_step(net, image, 2, generator=torch.Generator().manual_seed(5))
    stepped = [grads(stage) for stage in net.stages]
    aux_stepped = [grads(aux) for aux in net.aux]

    # Reference: for module i alone, forward the earlier modules without a graph, then backward L_i only.
    k = len(net.stages)
    for i in range(k):
        net.zero_grad(set_to_none=True)
        x = image
        for j in range(i):  # with a graph, then detached: the same arithmetic as the step's forward
            x = net.stages[j](x).detach()
        x_in = x
        x_out = net.stages[i](x_in)
        target = torch.tensor([2])
        if i < k - 1:
            # The same RFR locations: the step draws them from one generator across modules in order.
            gen = torch.Generator().manual_seed(5)
            for j in range(i):  # advance the stream as the earlier modules' RFR did
                net.aux[j].rfr.forward(*_maps(net, image, j), gen)
            loss = net.aux[i](x_in, x_out, target, gen)["total"]
        else:
            loss = F.cross_entropy(net.head(x_out)[0], target)
        loss.backward()
        reference = grads(net.stages[i])
        assert reference, f"module {i} has trainable parameters"
        assert set(reference) == set(stepped[i])
        for name, g in reference.items():
            torch.testing.assert_close(stepped[i][name], g, rtol=1e-4, atol=1e-6)
        for j in range(i):  # L_i sends nothing into earlier modules
            assert not grads(net.stages[j]), f"loss of module {i} reached module {j}"
        if i < k - 1:
            for name, g in grads(net.aux[i]).items():
                torch.testing.assert_close(aux_stepped[i][name], g, rtol=1e-4, atol=1e-6)


def _maps(net, image, j):
    with torch.no_grad():
        x = image
        for m in range(j):
            x = net.stages[m](x)
        return x, net.stages[j](x)


def test_k1_equals_plain_end_to_end_training_step():
    image = torch.randn(1, 3, 128, 144)
    net = make_net(1)
    reference = make_net(1)
    reference.load_state_dict(net.state_dict())
    opt_a = torch.optim.AdamW(net.param_groups(1e-3, 2e-3), weight_decay=1e-6)
    opt_b = torch.optim.AdamW(reference.param_groups(1e-3, 2e-3), weight_decay=1e-6)

    local_training_step(net, image, 1)
    opt_a.step()

    logits, _ = reference(image)  # trunk → H, one graph, one backward
    F.cross_entropy(logits, torch.tensor([1])).backward()
    opt_b.step()

    for (name, a), (_, b) in zip(net.state_dict().items(), reference.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_batchnorm_statistics_and_stem_unchanged_by_training():
    net = make_net(4)
    before = {n: b.clone() for n, b in net.trunk.named_buffers()}
    stem = net.trunk.conv1.weight.clone()
    block = net.trunk.layer1[0].conv1.weight.clone()
    opt = torch.optim.AdamW(net.param_groups(1e-2, 1e-2))
    for step in range(3):
        local_training_step(net, torch.randn(1, 3, 96, 96) * 3 + 1, step % 3)
        opt.step()
        opt.zero_grad()
    for name, buffer in net.trunk.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert torch.equal(net.trunk.conv1.weight, stem)
    assert not torch.equal(net.trunk.layer1[0].conv1.weight, block)  # the trainable convolutions did learn


def test_greedy_phase_trains_only_the_active_module():
    net = make_net(4)
    local_training_step(net, torch.randn(1, 3, 128, 128), 0, active=range(1, 2))
    assert not grads(net.stages[0]) and not grads(net.aux[0])
    assert grads(net.stages[1]) and grads(net.aux[1])
    assert not grads(net.stages[2]) and not grads(net.head)


def test_evaluation_forward_matches_the_inference_path():
    net = make_net(4)
    net.eval()
    image = torch.randn(1, 3, 128, 160)
    outputs = forward_all_classifiers(net, image)
    assert len(outputs) == 4
    with torch.no_grad():
        torch.testing.assert_close(outputs[-1], net(image)[0])
