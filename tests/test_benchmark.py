"""mmctx.benchmark: the training step trains, the training-memory measure
counts what a step holds, and interleaved timing reports every model."""
import math

import pytest
import torch
import torch.nn as nn

from mmctx.benchmark import (TrainingStep, bracketed_ratio,
                             denormal_gradients, median_interval,
                             target_loss, time_interleaved,
                             training_memory_bytes)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def test_training_step_updates_weights_and_bn_statistics():
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    mean_before = net[1].running_mean.clone()
    step = TrainingStep(net, lr=0.1)
    loss = step(torch.randn(2, 3, 8, 8))
    assert loss.ndim == 0 and net.training
    assert all(not torch.equal(a, b) for a, b in zip(before,
                                                      net.parameters()))
    assert not torch.equal(mean_before, net[1].running_mean)


def test_compared_backbones_follow_the_shipped_settings():
    """The cost tools build each backbone as the shipped configs do:
    detection freezes every BN's statistics and the stem + stage 1 (the
    context modules there keep training); segmentation trains every BN."""
    from mmengine.registry import MODELS

    import mmctx  # noqa: F401  (registers the backbones)
    from mmctx.benchmark import BACKBONES, CONTROLS, backbone_cfg
    from mmctx.models import SpatialBias
    from torch.nn.modules.batchnorm import _BatchNorm
    for name in {**BACKBONES, **CONTROLS}:
        det = MODELS.build(backbone_cfg(name, 'detection'))
        TrainingStep(det)
        assert not any(m.training for m in det.modules()
                       if isinstance(m, _BatchNorm)), name
        assert not any(p.requires_grad for p in det.layer1[0].conv1
                       .parameters()), name
        seg = MODELS.build(backbone_cfg(name, 'segmentation'))
        TrainingStep(seg)
        norms = [m for m in seg.modules() if isinstance(m, _BatchNorm)]
        assert norms and all(m.training for m in norms), name
    sb = MODELS.build(backbone_cfg('SB-R50', 'detection'))
    assert all(p.requires_grad for p in sb.layer1.modules()
               if isinstance(p, SpatialBias) for p in p.parameters())


def test_target_loss_keeps_outputs_alive_and_gradients_normal():
    """Ten SGD steps with the benchmarks' loss leave no denormal gradient
    in a GE backbone, where the mean square of the outputs saturates the
    gates and fills the gradients with denormals."""
    from mmengine.registry import MODELS

    import mmctx  # noqa: F401
    torch.manual_seed(0)
    net = MODELS.build(dict(type='GEResNet', depth=14, base_channels=8,
                            reference_input_size=32,
                            ge=dict(variant='depthwise_excite',
                                    reduction=4)))
    net.init_weights()
    step = TrainingStep(net, lr=0.01)
    x = torch.randn(2, 3, 32, 32)
    losses = [float(step(x)) for _ in range(10)]
    assert losses[-1] < losses[0]
    assert denormal_gradients(net) == 0
    outs = net(x)
    assert all(float(o.abs().mean()) > 1e-2 for o in outs)
    grad = next(net.parameters()).grad
    grad.view(-1)[0] = torch.finfo(torch.float32).tiny / 4
    assert denormal_gradients(net) == 1


def test_training_step_allocates_its_state_up_front_and_is_stock_sgd():
    """Gradients and momentum buffers exist from construction (one block of
    long-lived memory, not scattered among freed activations), and three
    steps give exactly the weights of a stock SGD loop."""
    import copy
    net = _net()
    reference = copy.deepcopy(net)
    step = TrainingStep(net, lr=0.1)
    for p in net.parameters():
        assert p.grad is not None and not p.grad.any()
        assert not step.optimizer.state[p]['momentum_buffer'].any()
    reference.train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1,
                                momentum=0.9, weight_decay=1e-4)
    for seed in range(3):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(
            seed))
        step(x)
        optimizer.zero_grad()
        target_loss(reference(x), {}).backward()
        optimizer.step()
    for a, b in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_training_memory_counts_state_and_saved_activations():
    net = _net()
    params = sum(p.numel() for p in net.parameters())
    small = training_memory_bytes(net, torch.randn(1, 3, 16, 16))
    large = training_memory_bytes(net, torch.randn(2, 3, 16, 16))
    state = 3 * 4 * params  # weight, gradient, momentum in float32
    assert small > state
    # activations scale with the batch, the state does not (BN's per-channel
    # batch statistics are the only other saved tensors); saved per image:
    # the input (conv1), conv1's output (BN), ReLU's output (ReLU and conv2,
    # one storage) and conv2's output (the loss's square), all float32
    per_image = large - small
    assert 0 <= (small - state) - per_image <= 4 * 8 * 4
    assert per_image == 4 * 16 * 16 * (3 + 8 + 8 + 4)


def test_training_memory_frees_the_graph_it_measures():
    """The measured forward's saved tensors die with the call (packing a
    tensor as itself in ``saved_tensors_hooks`` kept the whole graph alive:
    +1.5 GB per call for R50 at 800x1216)."""
    import gc
    import weakref
    net = _net()
    outputs = []
    net[0].register_forward_hook(
        lambda m, i, o: outputs.append(weakref.ref(o)))
    training_memory_bytes(net, torch.randn(1, 3, 16, 16))
    gc.collect()
    assert len(outputs) == 2  # the step's forward and the measured one
    assert all(ref() is None for ref in outputs)


def test_time_interleaved_reports_medians_for_every_callable():
    calls = {'a': lambda x: x + 1, 'b': lambda x: target_loss((x, x), {})}
    wall, cpu = time_interleaved(calls, torch.ones(4), warmup=1, repeats=3)
    assert set(wall) == set(cpu) == {'a', 'b'}
    assert all(v >= 0 for v in wall.values())


def test_bracketed_ratio_compares_each_run_with_the_base_runs_around_it():
    """The base runs between every two models; each ratio divides by the
    mean of its two neighbours, so a machine that slows down 3x over the
    run (fake clock below) still gives 2.0 for a model twice as slow."""
    import time as time_module
    clock = [0.0]
    speed = [1.0]

    def work(cost):
        def call(x):
            clock[0] += cost * speed[0]
            speed[0] += 0.1  # every call runs on a slower machine
        return call

    calls = {'R50': work(1.0), 'twice': work(2.0), 'same': work(1.0)}
    ratios = {}
    real = time_module.perf_counter
    time_module.perf_counter = lambda: clock[0]
    try:
        time_interleaved(calls, None, warmup=1, repeats=4, base='R50',
                         ratios=ratios)
    finally:
        time_module.perf_counter = real
    assert set(ratios) == {'twice', 'same'}
    assert [len(v) for v in ratios.values()] == [4, 4]
    assert bracketed_ratio(ratios, 'twice') == pytest.approx(2.0)
    assert bracketed_ratio(ratios, 'same') == pytest.approx(1.0)
    assert bracketed_ratio(ratios, 'R50') == 1.0


def test_median_interval_uses_binomial_order_statistics():
    """95% intervals of the median from order statistics: the published
    ranks (e.g. Conover, Practical Nonparametric Statistics, table A3):
    n = 6 -> (1st, 6th), 9 -> (2nd, 8th), 15 -> (4th, 12th), 20 ->
    (6th, 15th); fewer than 6 values cannot reach 95%: (min, max)."""
    for n, rank in ((1, 1), (5, 1), (6, 1), (8, 1), (9, 2), (15, 4),
                    (20, 6)):
        values = [10.0 * v for v in range(n, 0, -1)]  # order is irrelevant
        assert median_interval(values) == (10.0 * rank,
                                           10.0 * (n + 1 - rank)), n
    assert median_interval(range(1, 16), confidence=0.5) == (6, 10)
    with pytest.raises(ValueError, match='at least one value'):
        median_interval([])


def test_median_interval_covers_the_median_as_often_as_promised():
    """Sampling check: for n = 15 from a skewed distribution, the interval
    holds the true median in >= 95% of 4000 draws (exact coverage 96.5%)."""
    import random
    rng = random.Random(0)
    median = math.log(2)  # of Exp(1)
    hits = 0
    for _ in range(4000):
        low, high = median_interval([rng.expovariate(1) for _ in range(15)])
        hits += low <= median <= high
    assert 0.95 <= hits / 4000 <= 0.98


def test_profiles_count_every_aten_op():
    """op_self_times sees the plain ops of the SB branch (its 1-D conv,
    bilinear upsampling, the concatenation)."""
    from mmctx.benchmark import op_self_times
    from mmctx.models import SBResNet
    net = SBResNet(depth=50, base_channels=16, num_stages=1,
                   out_indices=(0, ), strides=(1, ), dilations=(1, ),
                   stage_with_sb=(True, ))
    net.eval()
    times = op_self_times(torch.no_grad()(net), torch.randn(1, 3, 32, 32),
                          repeats=2)
    for name in ('aten::conv1d', 'aten::upsample_bilinear2d', 'aten::cat'):
        assert times[name] > 0
