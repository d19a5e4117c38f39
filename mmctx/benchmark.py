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
import contextlib
import math
import statistics
import time
from collections import defaultdict

import torch

# The backbones the cost tools compare, as registry configs. mmdet 3.3.0
# ships no NonLocal config; NL sits like GCNet's ContextBlock, after conv3
# (on the residual branch) of every block of the chosen stages. All train
# their BN statistics in a training step (``norm_eval=False``, as in
# ImageNet / CIFAR pre-training; mmdet's ResNet defaults to True, frozen
# statistics, the detection fine-tuning setting).
R50 = dict(type='mmdet.ResNet', depth=50, norm_eval=False)
NL = dict(type='NonLocal2d', reduction=4, use_scale=True,
          mode='embedded_gaussian')
GC = dict(type='ContextBlock', ratio=1. / 16)  # mmdet configs/gcnet, r16
BACKBONES = {
    'R50': R50,
    'SB-R50': dict(type='SBResNet', depth=50, norm_eval=False),
    'GE-θ⁻-R50': dict(type='GEResNet', depth=50, norm_eval=False,
                      ge=dict(variant='parameter_free', extent='global')),
    'GE-θ-R50': dict(type='GEResNet', depth=50, norm_eval=False,
                     ge=dict(variant='depthwise', extent='global')),
    'GE-θ⁺-R50': dict(type='GEResNet', depth=50, norm_eval=False,
                      ge=dict(variant='depthwise_excite', extent='global')),
    'PSI-R50': dict(type='PSIResNet', depth=50, norm_eval=False),
    'NL-R50 (c4)': dict(R50, plugins=[dict(
        cfg=NL, stages=(False, False, True, False), position='after_conv3')]),
    'GC-R50 (r16, c3-c5)': dict(R50, plugins=[dict(
        cfg=GC, stages=(False, True, True, True), position='after_conv3')]),
}

# A second, identical R50 (``--models 'R50 (again)'``): its ratio to R50 in
# the same run is the measurement's noise.
CONTROLS = {'R50 (again)': R50}


def stage_loss(outputs):
    """A scalar that depends on every stage output (their mean squares)."""
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs, )
    return sum(o.float().pow(2).mean() for o in outputs)


class TrainingStep:
    """One SGD training step of ``model`` on a fixed input, callable.

    Args:
        model (nn.Module): The backbone (put in train mode here).
        lr (float): SGD learning rate. 0 by default: the step still does
            all of SGD's work (momentum, weight decay, update), and every
            repeat computes on the same weights. A small nonzero rate would
            move the zero-initialised layers (ResNet's last BN of each block,
            the context modules' last layers) to tiny values whose products
            are denormal floats, which CPUs compute several times slower:
            the timing would measure that artefact of the init, not the
            model (a 2.4x slower GE-θ⁻ training step at 400x608).
        autocast (bool): Run forward and loss under ``torch.autocast`` of
            the input's device type (bfloat16 on CPU, float16 on CUDA).
    """

    def __init__(self, model, lr=0.0, autocast=False):
        model.train()  # mmdet's ResNet.train() returns None
        self.model = model
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
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
            loss = stage_loss(self.model(x))
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
            loss = stage_loss(model(x))
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


def time_two_paths(fast, plain, repeats=45, warmup=2):
    """Time two callables back to back, ``repeats`` times, alternating which
    runs first; returns (median of the per-pair ratios fast / plain, median
    fast ms, median plain ms). For comparing two code paths of one layer,
    where whole-network timings cannot resolve the difference."""
    ratios, fast_ms, plain_ms = [], [], []
    for i in range(warmup + repeats):
        pair = {}
        for name, call in ((('fast', fast), ('plain', plain)) if i % 2 == 0
                           else (('plain', plain), ('fast', fast))):
            start = time.perf_counter()
            call()
            pair[name] = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            ratios.append(pair['fast'] / pair['plain'])
            fast_ms.append(pair['fast'])
            plain_ms.append(pair['plain'])
    return (statistics.median(ratios), statistics.median(fast_ms),
            statistics.median(plain_ms))


class _RecordedKernels:
    """The compiled loops of ``mmctx.models.norm_gate.kernels()``, each call
    recorded as a profiler event ``mmctx::<name>``: they are not ATen ops,
    so the profiler would otherwise add their time to nothing (it would
    fall between the events)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        function = getattr(self._module, name)

        def recorded(*args):
            with torch.profiler.record_function(f'mmctx::{name}'):
                return function(*args)

        return recorded


@contextlib.contextmanager
def recorded_kernels():
    """Within: every call of mmctx's compiled loops is a profiler event."""
    from mmctx.models import norm_gate
    module = norm_gate.kernels()
    if module is None:
        yield
        return
    norm_gate._kernels[0] = _RecordedKernels(module)
    try:
        yield
    finally:
        norm_gate._kernels[0] = module


def op_self_times(call, x, repeats=3):
    """Median self CPU time in ms of each profiler event (aten op, autograd
    node, optimizer step, one of mmctx's compiled loops as
    ``mmctx::<name>``) over ``repeats`` profiled calls of ``call(x)``,
    after one unprofiled warm-up call."""
    from torch.profiler import ProfilerActivity, profile
    call(x)
    runs = defaultdict(list)
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof, \
                recorded_kernels():
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
