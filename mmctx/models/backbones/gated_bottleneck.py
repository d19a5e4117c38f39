"""Upstream Bottleneck whose gating plugin after conv3 (GE, PSI) applies its
gate and the residual add in one pass."""
import torch
import torch.utils.checkpoint as cp
from mmdet.models.backbones.resnet import Bottleneck

from ..utils import hooked, size_generic_path


class GatedBottleneck(Bottleneck):
    """Upstream Bottleneck that fuses the last after_conv3 plugin's gate with
    the residual add.

    A gate after conv3 + bn3 multiplies the map, then the block adds the
    identity: two passes over the map, the product written out only to be
    read back. When the last after_conv3 plugin has ``forward_residual(x,
    identity)`` (:class:`~mmctx.models.GatherExcite`,
    :class:`~mmctx.models.PatchSpatialInteraction`), the block calls it
    instead, which computes ``identity + gate(x)`` in one ``addcmul``, in
    training and in inference. The layers, plugins, hooks on them and
    checkpointing (``with_cp``) are the upstream ones; only the order of the
    downsample and that plugin changes. Traced / exported graphs, FLOP
    counters and a hooked gate take the upstream forward; both compute the
    same output (``tests/test_fast_paths.py``).
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

    def forward(self, x):
        gate = self.residual_gate(x)
        if gate is None:
            return super().forward(x)

        def _inner_forward(x):
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.forward_plugin(out, self.after_conv1_plugin_names)
            out = self.relu(self.norm2(self.conv2(out)))
            out = self.forward_plugin(out, self.after_conv2_plugin_names)
            out = self.norm3(self.conv3(out))
            out = self.forward_plugin(out,
                                      self.after_conv3_plugin_names[:-1])
            identity = x if self.downsample is None else self.downsample(x)
            return gate.forward_residual(out, identity)

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return self.relu(out)
