"""Cost of a backbone: training-step time and training memory, measured the
same way for every model so that ratios against a plain ResNet are fair
(used by ``tools/analysis/complexity.py``).

A *training step* is what a user's iteration costs the backbone: train mode
(BN updating its statistics), forward, a scalar loss over every stage
output, backward, and an SGD step (momentum 0.9, weight decay 1e-4).

*Training memory* is the memory a training step holds at its peak, the end
of the forward pass: the parameters, their gradients and momentum buffers,
and the tensors autograd saved for the backward pass (each storage counted
once, found with ``torch.autograd.graph.saved_tensors_hooks``). On CUDA the
allocator's own peak (``torch.cuda.max_memory_allocated``) is reported
instead. The CPU figure is deterministic: it does not depend on the
allocator or on other processes.
"""
import math
import statistics
import time
from collections import defaultdict

import torch

# The backbones the cost tools compare, as registry configs, before the
# setting (:data:`SETTINGS`) is applied. mmdet 3.3.0 ships no NonLocal
# config; NL sits like GCNet's ContextBlock, after conv3 (on the residual
# branch) of every block of the chosen stages.
R50 = dict(type='mmdet.ResNet', depth=50)
NL = dict(type='NonLocal2d', reduction=4, use_scale=True,
          mode='embedded_gaussian')
GC = dict(type='ContextBlock', ratio=1. / 16)  # mmdet configs/gcnet, r16
BACKBONES = {
    'R50': R50,
    'SB-R50': dict(type='SBResNet', depth=50),
    'GE-θ⁻-R50': dict(type='GEResNet', depth=50,
                      ge=dict(variant='parameter_free', extent='global')),
    'GE-θ-R50': dict(type='GEResNet', depth=50,
                     ge=dict(variant='depthwise', extent='global')),
    'GE-θ⁺-R50': dict(type='GEResNet', depth=50,
                      ge=dict(variant='depthwise_excite', extent='global')),
    'PSI-R50': dict(type='PSIResNet', depth=50),
    'NL-R50 (c4)': dict(R50, plugins=[dict(
        cfg=NL, stages=(False, False, True, False), position='after_conv3')]),
    'GC-R50 (r16, c3-c5)': dict(R50, plugins=[dict(
        cfg=GC, stages=(False, True, True, True), position='after_conv3')]),
}

# A second, identical R50 (``--models 'R50 (again)'``): its ratio to R50 in
# the same run is the measurement's noise.
CONTROLS = {'R50 (again)': R50}

# How the shipped configs build the backbone: detection fine-tunes with
# frozen BN statistics and a frozen stem + stage 1 (mmdet's configs);
# segmentation (mmseg) and classification (mmpretrain) train every BN.
SETTINGS = {
    'detection': dict(norm_eval=True, frozen_stages=1),
    'segmentation': dict(norm_eval=False, frozen_stages=-1),
}


def backbone_cfg(name, setting='detection'):
    """The registry config of backbone ``name`` as the ``setting``'s
    shipped configs build it."""
    return dict({**BACKBONES, **CONTROLS}[name], **SETTINGS[setting])


def target_loss(outputs, targets):
    """Mean squared distance of every stage output to a fixed target of its
    shape (uniform in [0, 1), like a ReLU output): a loss that keeps the
    outputs alive. A loss that drives them to zero (their mean squares)
    saturates GE's and PSI's gates within two SGD steps and fills the
    gradients with denormal floats, which CPUs compute several times
    slower: a benchmark would time that, not the model."""
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs, )
    loss = 0
    for out in outputs:
        key = (tuple(out.shape), out.device)
        if key not in targets:
            gen = torch.Generator().manual_seed(len(targets))
            targets[key] = torch.rand(out.shape, generator=gen).to(
                out.device)
        loss = loss + (out.float() - targets[key]).square().mean()
    return loss


def denormal_gradients(model):
    """How many gradient values of ``model`` are denormal floats."""
    count = 0
    for p in model.parameters():
        if p.grad is not None and p.grad.is_floating_point():
            tiny = torch.finfo(p.grad.dtype).tiny
            g = p.grad.abs()
            count += int(((g > 0) & (g < tiny)).sum())
    return count


class TrainingStep:
    """One SGD training step of ``model`` on a fixed input, callable: train
    mode, forward, :func:`target_loss`, backward, an SGD step (lr 0.01,
    momentum 0.9, weight decay 1e-4), as a training job's iteration.

    Args:
        model (nn.Module): The backbone (put in train mode here; under
            ``norm_eval`` its BNs stay in eval mode, as upstream's
            ``train()`` leaves them).
        lr (float): SGD learning rate.
        autocast (bool): Run forward and loss under ``torch.autocast`` of
            the input's device type (bfloat16 on CPU, float16 on CUDA).
        forward (callable, optional): What computes the outputs (e.g. the
            ``torch.compile`` of ``model``); default ``model`` itself.
    """

    def __init__(self, model, lr=0.01, autocast=False, forward=None):
        model.train()  # mmdet's ResNet.train() returns None
        self.model = model
        self.forward = model if forward is None else forward
        self.targets = {}
        self.optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=lr,
            momentum=0.9, weight_decay=1e-4)
        self.autocast = autocast
        # Gradients and momentum buffers exist from a training job's first
        # iteration: allocate them now, before any activation, so no timed
        # round allocates them and they sit together, outside the heap that
        # activations churn. With dampening 0, SGD's first step from a zero
        # buffer is the stock one (the buffer becomes the gradient).
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
                self.optimizer.state[p]['momentum_buffer'] = \
                    torch.zeros_like(p)

    def __call__(self, x):
        with torch.autocast(x.device.type, enabled=self.autocast,
                            dtype=torch.bfloat16 if x.device.type == 'cpu'
                            else torch.float16):
            loss = target_loss(self.forward(x), self.targets)
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()
        return loss


def _storage_key(tensor):
    try:
        storage = tensor.untyped_storage()
        return (storage.data_ptr(), storage.nbytes())
    except (RuntimeError, NotImplementedError):
        return (id(tensor), tensor.numel() * tensor.element_size())


def training_memory_bytes(model, x, autocast=False):
    """Bytes held at the peak of one training step on CPU (see the module
    docstring): parameters + gradients + momentum + saved activations.
    ``model`` is left in train mode with one step taken (lr 0)."""
    step = TrainingStep(model, lr=0.0, autocast=autocast)
    step(x)  # gradients and momentum buffers now exist
    state = 0
    for p in model.parameters():
        state += 3 * p.numel() * p.element_size()  # weight, grad, momentum
    saved = {}

    def pack(tensor):
        key = _storage_key(tensor)
        if key[0] and key not in saved:
            saved[key] = key[1]
        # Not the tensor itself: a saved output packed as itself refers
        # back to the graph node that saves it, a cycle through C++ that
        # Python's collector cannot see, so the whole graph (every saved
        # activation) outlived the call. A detached view holds only the
        # storage; this graph is never run backward.
        return tensor.detach()

    param_keys = {_storage_key(p) for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, enabled=autocast,
                            dtype=torch.bfloat16):
            loss = target_loss(model(x), step.targets)
    activations = sum(n for k, n in saved.items() if k not in param_keys)
    del loss
    return state + activations


def cuda_training_memory_bytes(model, x, autocast=False):
    """Allocator peak of one CUDA training step, after a warm-up step."""
    step = TrainingStep(model, lr=0.0, autocast=autocast)
    step(x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def time_interleaved(calls, x, warmup=1, repeats=5, sync=None, base=None,
                     ratios=None):
    """Median wall-clock ms and median process CPU ms of each callable in
    ``calls`` (name -> fn(x)), timed round-robin with a rotating start so
    that machine noise hits all of them alike.

    With ``base`` (a name in ``calls``), each round runs ``base`` between
    every two others (``base, a, base, b, ..., base``), and the dict
    ``ratios`` receives, per other name, every round's time divided by the
    mean of the two ``base`` runs around it (see :func:`bracketed_ratio`).
    """
    wall, cpu = defaultdict(list), defaultdict(list)
    names = list(calls)
    others = [n for n in names if n != base]
    for rnd in range(warmup + repeats):
        shift = rnd % len(others) if others else 0
        order = others[shift:] + others[:shift]
        if base is not None:
            order = [base] + [n for o in order for n in (o, base)]
        times = []
        for name in order:
            if sync:
                sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            calls[name](x)
            if sync:
                sync()
            times.append((time.perf_counter() - start) * 1e3)
            if rnd >= warmup:
                wall[name].append(times[-1])
                cpu[name].append((time.process_time() - start_cpu) * 1e3)
        if base is not None and ratios is not None and rnd >= warmup:
            for i in range(1, len(order), 2):
                ratios.setdefault(order[i], []).append(
                    2 * times[i] / (times[i - 1] + times[i + 1]))
    return ({n: statistics.median(wall[n]) for n in names},
            {n: statistics.median(cpu[n]) for n in names})


def bracketed_ratio(ratios, name):
    """Median over rounds of ``name``'s time over the mean of the two base
    runs just before and after it (:func:`time_interleaved` with
    ``base``). This VM's speed changes by 10-20% within seconds (R50's own
    forward: 380-540 ms in 15 back-to-back runs); a run compared with its
    neighbours cancels that, where a ratio of two medians taken over
    minutes keeps it. 1.0 for the base itself."""
    return statistics.median(ratios[name]) if name in ratios else 1.0


def median_interval(values, confidence=0.95):
    """Distribution-free confidence interval of the median of ``values``:
    (the j-th smallest, the j-th largest), with j the largest rank such
    that the median of the sampled distribution lies outside it with
    probability at most 1 - ``confidence`` (each value falls below the
    median with probability 1/2, so the count below is Binomial(n, 1/2)).
    With too few values for that coverage (fewer than 6 at 95%) the
    interval is (min, max). Assumes independent values: rounds of
    :func:`time_interleaved` bracketed by the base, whose drift the
    bracketing removes."""
    values = sorted(values)
    n = len(values)
    if not n:
        raise ValueError('median_interval needs at least one value')
    tail = (1 - confidence) / 2
    rank, at_most = 0, 0.0  # at_most: P(count below the median <= rank)
    while rank < n // 2:
        at_most += math.comb(n, rank) / 2**n
        if at_most > tail:
            break
        rank += 1  # the rank-th smallest value is below the median
    rank = max(rank, 1)  # 1-based; (min, max) when none qualifies
    return values[rank - 1], values[n - rank]


def op_self_times(call, x, repeats=3):
    """Median self CPU time in ms of each profiler event (aten op, autograd
    node, optimizer step) over ``repeats`` profiled calls of ``call(x)``,
    after one unprofiled warm-up call."""
    from torch.profiler import ProfilerActivity, profile
    call(x)
    runs = defaultdict(list)
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            call(x)
        totals = defaultdict(float)
        for event in prof.key_averages():
            totals[event.key] += event.self_cpu_time_total / 1e3
        for key in set(totals) | set(runs):
            runs[key].append(totals.get(key, 0.0))
    return {key: statistics.median(v + [0.0] * (repeats - len(v)))
            for key, v in runs.items()}


def op_time_difference(times, base):
    """(op, ms in ``times``, ms more than in ``base``) for every op,
    largest difference first: where a model's extra time goes."""
    rows = [(op, ms, ms - base.get(op, 0.0)) for op, ms in times.items()]
    rows += [(op, 0.0, -ms) for op, ms in base.items() if op not in times]
    return sorted(rows, key=lambda row: -row[2])
