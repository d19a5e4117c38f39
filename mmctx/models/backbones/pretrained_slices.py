"""Parameters whose leading slice is pretrained and frozen while the rest
trains: where SB widens a pretrained layer of a frozen stage (bn2 and conv3
take conv2's channels plus the bias channels), only the bias part may train.

Zeroing gradients is not enough for that: weight decay (SGD's or AdamW's)
changes every parameter the optimizer updates, even with a zero gradient. So
the whole tensor ``<name>`` is split into two parameters, a frozen
``<name>_pretrained`` (``requires_grad=False``: it never gets a gradient, and
optimizers skip it) and a trainable ``<name>_context``. Everything else stays:
the layer computes with the whole tensor, composed before each forward (as a
plain attribute ``<name>``, like ``torch.nn.utils.prune`` does), the state
dict keeps the whole tensor under ``<name>``, and the parameter count is the
same. Only split layers pay for the composition (one small concatenation).

The whole tensors in ``state_dict()`` are copies, not views of the
parameters: code that writes into ``state_dict()`` values in place (e.g. an
EMA model with ``update_buffers=True``) does not reach the split ones;
``load_state_dict`` and parameter-wise code (optimizers, EMA over
``named_parameters``) do.
"""
from collections import namedtuple
from contextlib import contextmanager

import torch
import torch.nn as nn

_SliceSpec = namedtuple('_SliceSpec', 'names dim num_pretrained order')


def split_pretrained_slices(module, names, dim, num_pretrained):
    """Freeze entries ``[:num_pretrained]`` along ``dim`` of the parameters
    ``names`` of ``module`` and keep the rest trainable (see module doc).

    Names the module does not have (e.g. ``bias=False``) are skipped; a module
    already split is left as it is.
    """
    if is_split(module):
        return
    names = tuple(n for n in names if getattr(module, n, None) is not None)
    order = tuple(module._parameters)
    for name in names:
        whole = getattr(module, name)
        delattr(module, name)
        pretrained, context = whole.detach().split(
            [num_pretrained, whole.shape[dim] - num_pretrained], dim)
        module.register_parameter(
            f'{name}_pretrained',
            nn.Parameter(pretrained.clone(), requires_grad=False))
        module.register_parameter(
            f'{name}_context',
            nn.Parameter(context.clone(), requires_grad=whole.requires_grad))
    module._pretrained_slices = _SliceSpec(names, dim, num_pretrained, order)
    module._slices_editable = False
    module.register_forward_pre_hook(_compose)
    module.register_state_dict_post_hook(_save_whole)
    module.register_load_state_dict_pre_hook(_load_whole)
    with torch.no_grad():
        _compose(module, ())


def is_split(module):
    """Whether :func:`split_pretrained_slices` split ``module``."""
    return '_pretrained_slices' in module.__dict__


def context_parameters(module):
    """The trainable ``<name>_context`` parameters of a split ``module``."""
    return [
        getattr(module, f'{name}_context')
        for name in module._pretrained_slices.names
    ]


def whole_tensor(module, name):
    """``<name>_pretrained`` and ``<name>_context`` joined (differentiable)."""
    return torch.cat([
        getattr(module, f'{name}_pretrained'),
        getattr(module, f'{name}_context')
    ], module._pretrained_slices.dim)


def _compose(module, inputs):
    if not module._slices_editable:
        for name in module._pretrained_slices.names:
            setattr(module, name, whole_tensor(module, name))


def _save_whole(module, state_dict, prefix, local_metadata):
    # Whole tensors under the original keys, in the original key order.
    spec = module._pretrained_slices
    entries = {
        key[len(prefix):]: state_dict.pop(key)
        for key in [k for k in state_dict if k.startswith(prefix)]
    }
    for name in spec.order:
        if name in spec.names:
            state_dict[prefix + name] = torch.cat([
                entries.pop(f'{name}_pretrained'),
                entries.pop(f'{name}_context')
            ], spec.dim)
        elif name in entries:
            state_dict[prefix + name] = entries.pop(name)
    for name, value in entries.items():  # buffers
        state_dict[prefix + name] = value


def _load_whole(module, state_dict, prefix, local_metadata, strict,
                missing_keys, unexpected_keys, error_msgs):
    # A whole tensor under the original key is split into the two slices;
    # a missing or misshapen one is reported under the original key.
    spec = module._pretrained_slices
    for name in spec.names:
        key = prefix + name
        if f'{key}_pretrained' in state_dict:
            continue
        current = whole_tensor(module, name).detach()
        value = state_dict.pop(key, None)
        if value is None:
            if strict:
                missing_keys.append(key)
            value = current
        elif value.shape != current.shape:
            error_msgs.append(
                f'size mismatch for {key}: copying a param with shape '
                f'{tuple(value.shape)} from checkpoint, the shape in current '
                f'model is {tuple(current.shape)}.')
            value = current
        pretrained, context = value.split(
            [spec.num_pretrained, value.shape[spec.dim] - spec.num_pretrained],
            spec.dim)
        state_dict[f'{key}_pretrained'] = pretrained
        state_dict[f'{key}_context'] = context


@contextmanager
def editable_pretrained_slices(module):
    """Within this context, every split parameter of ``module`` and its
    submodules is the plain whole tensor ``<name>``, and what is written into
    it in place (initialisers: ``kaiming_init(conv)``, ``conv.weight[...] =
    0``) is copied into the two slices on exit. Nested uses are no-ops."""
    edits = []
    for m in module.modules():
        if is_split(m) and not m._slices_editable:
            m._slices_editable = True
            for name in m._pretrained_slices.names:
                whole = whole_tensor(m, name).detach().clone()
                setattr(m, name, whole)
                edits.append((m, name, whole.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, original in edits:
                edited = getattr(m, name)
                if not torch.equal(edited, original):
                    spec = m._pretrained_slices
                    pretrained, context = edited.split([
                        spec.num_pretrained,
                        edited.shape[spec.dim] - spec.num_pretrained
                    ], spec.dim)
                    getattr(m, f'{name}_pretrained').copy_(pretrained)
                    getattr(m, f'{name}_context').copy_(context)
            for m, _, _ in edits:
                m._slices_editable = False
                _compose(m, ())
