"""Upstream Bottleneck whose gating plugin after conv3 (GE, PSI) applies its
gate and the residual add in one pass, and in training runs bn3, the gate,
the add and the ReLU as one function."""
import torch
import torch.utils.checkpoint as cp
from mmdet.models.backbones.resnet import Bottleneck
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils import hooked, size_generic_path


class GatedBottleneck(Bottleneck):
    """Upstream Bottleneck that fuses the last after_conv3 plugin's gate with
    the residual add, and in training with bn3 and the ReLU too.

    A gate after conv3 + bn3 multiplies the map, then the block adds the
    identity: two passes over the map, the product written out only to be
    read back. When the last after_conv3 plugin has ``forward_residual(x,
    identity)`` (:class:`~mmctx.models.GatherExcite`,
    :class:`~mmctx.models.PatchSpatialInteraction`), the block calls it
    instead, which computes ``identity + gate(x)`` in one ``addcmul``, in
    training and in inference.

    In inference (eval mode, no autograd), with bn3 an eval BatchNorm,
    the gate's ``forward_inference_tail`` folds bn3 into the gate and
    writes ``relu(identity + gate(bn3(z)))`` in one pass, where the plain
    ops take three (bn3, the gated add, the ReLU).

    In training, with bn3 a training-mode BatchNorm (``norm_eval=False``)
    and the gate its only after_conv3 plugin, the block asks the gate's
    ``forward_tail(z, identity, bn3)`` for the whole tail, ``relu(identity
    + gate(bn3(z)))`` on conv3's output ``z``: one autograd function whose
    passes over the map read ``z`` for BatchNorm's statistics and the
    gate's context together (:mod:`mmctx.models.norm_gate`,
    :mod:`mmctx.models.norm_pixel_gate`), where the gate's
    ``tail_applies`` says it can.

    The layers, plugins, hooks on them and checkpointing (``with_cp``) are
    the upstream ones; only the order of the downsample and the tail
    changes. Traced / exported graphs, FLOP counters and a hooked gate take
    the upstream forward; all paths compute the same output
    (``tests/test_fast_paths.py``, ``tests/test_norm_gate.py``,
    ``tests/test_norm_pixel_gate.py``).
    """

    def residual_gate(self, x):
        """The plugin that will add the identity itself, or None."""
        if not self.with_plugins or not self.after_conv3_plugin_names \
                or size_generic_path(x) or torch.jit.is_tracing():
            return None
        gate = getattr(self, self.after_conv3_plugin_names[-1])
        if not hasattr(gate, 'forward_residual') or hooked(gate):
            return None
        return gate

    def _tail_may_fuse(self, gate):
        """Whether ``gate`` may run bn3, itself, the add and the ReLU (its
        ``tail_applies`` decides on conv3's output)."""
        norm3 = getattr(self, self.norm3_name)
        return (self.training and norm3.training
                and isinstance(norm3, _BatchNorm)
                and len(self.after_conv3_plugin_names) == 1
                and hasattr(gate, 'forward_tail') and not hooked(self.relu))

    def _inference_tail_may_fuse(self, gate):
        """Whether ``gate`` may run bn3, itself, the add and the ReLU in
        inference (its ``inference_tail_applies`` decides on conv3's
        output)."""
        if gate is None or self.training or torch.is_grad_enabled():
            return False
        norm3 = getattr(self, self.norm3_name)
        return (isinstance(norm3, _BatchNorm) and not norm3.training
                and len(self.after_conv3_plugin_names) == 1
                and hasattr(gate, 'forward_inference_tail')
                and not hooked(self.relu))

    def _tail_may_overwrite(self):
        """Whether the inference tail may write over conv3's output: it is
        this block's temporary unless a hook of conv3 may have kept it."""
        return not hooked(self.conv3)

    def forward(self, x):
        gate = self.residual_gate(x)
        if gate is None:
            return super().forward(x)
        norm3 = getattr(self, self.norm3_name)
        train_fuses = self._tail_may_fuse(gate)
        infer_fuses = self._inference_tail_may_fuse(gate)
        tail_may_fuse = train_fuses or infer_fuses

        def _inner_forward(x):
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.forward_plugin(out, self.after_conv1_plugin_names)
            out = self.relu(self.norm2(self.conv2(out)))
            out = self.forward_plugin(out, self.after_conv2_plugin_names)
            out = self.conv3(out)
            identity = x if self.downsample is None else self.downsample(x)
            if train_fuses and gate.tail_applies(norm3, out, identity):
                return gate.forward_tail(out, identity, norm3)
            if infer_fuses and gate.inference_tail_applies(norm3, out,
                                                           identity):
                return gate.forward_inference_tail(
                    out, identity, norm3, in_place=self._tail_may_overwrite())
            out = self.forward_plugin(norm3(out),
                                      self.after_conv3_plugin_names[:-1])
            out = gate.forward_residual(out, identity)
            # the ReLU goes where the fused tail has it
            return self.relu(out) if tail_may_fuse else out

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return out if tail_may_fuse else self.relu(out)
