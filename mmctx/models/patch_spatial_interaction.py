"""Patch Spatial Interaction ("Patch Spatial Interactions for Long-Range
Dependencies in CNNs"): squeeze-and-excitation over space."""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule, constant_init
from mmengine.registry import MODELS

from . import norm_gate, norm_pixel_gate
from .gating import pixel_gate_add
from .utils import (_pool_matrix, check_init_cfg, check_positive_int,
                    check_real, check_size, pointwise_conv, resample_to,
                    size_generic_path)


@MODELS.register_module()
class PatchSpatialInteraction(BaseModule):
    """Patch Spatial Interaction (PSI): one weight per image patch, computed
    from all patches at once.

    A conv with kernel = stride = patch size ``p`` squeezes the C channels to
    one and patchifies the map into a ``grid_size x grid_size`` grid; an MLP
    (n*n -> n*n*hidden_ratio, ReLU -> n*n) mixes all patches, a sigmoid gives
    each patch a weight, and every pixel is multiplied by its patch's weight.

    The patch size comes from the reference feature size S (e.g. 64/32/16/8
    in the four ResNet stages at 256 input): ``p = S / grid_size`` when S is a
    multiple of the grid, otherwise every pixel is its own patch (p = 1, grid
    S). At other input sizes the map is first average-pooled to the
    reference size, so the grid always covers the whole map and the MLP keeps
    its meaning; at the reference size this is exact.

    The last MLP layer starts at zero, so the gate starts as the constant 0.5
    (``constant_gate``); a backbone starting from a plain ResNet checkpoint
    compensates that constant in the preceding norm layer.

    Args:
        in_channels (int): Channels C of the input.
        feature_size (int | tuple[int]): Reference (H, W) of the feature map
            (required; the default None raises ValueError naming it).
        grid_size (int): Patches per side n (16).
        hidden_ratio (float): Hidden width of the MLP relative to n*n (1/2).
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 in_channels,
                 feature_size=None,
                 grid_size=16,
                 hidden_ratio=0.5,
                 init_cfg=None):
        check_init_cfg('init_cfg', init_cfg)
        super().__init__(init_cfg)
        in_channels = check_positive_int('in_channels', in_channels)
        grid_size = check_positive_int('grid_size', grid_size)
        if feature_size is None:
            raise ValueError(
                'feature_size (the reference H, W of the feature map, which '
                'fixes the patch size) is required; as a plugin of a stock '
                'ResNet give it per stage, or use the PSIResNet backbone, '
                'which derives it from reference_input_size')
        feature_size = check_size('feature_size', feature_size)
        hidden_ratio = check_real('hidden_ratio', hidden_ratio, 0, 1)
        if all(side % grid_size == 0 for side in feature_size):
            patch = tuple(side // grid_size for side in feature_size)
            grid = (grid_size, grid_size)
        else:
            patch, grid = (1, 1), feature_size
        num_patches = grid[0] * grid[1]
        hidden = max(1, int(num_patches * hidden_ratio))
        self.in_channels = in_channels
        self.feature_size = feature_size
        self.grid = grid

        self.squeeze = nn.Conv2d(in_channels, 1, patch, stride=patch)
        self.mlp = nn.Sequential(
            nn.Linear(num_patches, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_patches))

    @property
    def constant_gate(self):
        """Gate value after :meth:`init_weights`."""
        return 0.5

    def init_weights(self):
        super().init_weights()
        # Zero the last layer: the gate starts as sigmoid(0) everywhere.
        constant_init(self.mlp[-1], 0)

    def squeeze_patches(self, x):
        """One value per patch: ``squeeze(resample_to(x, feature_size))``.

        Away from the reference size, the channels are squeezed before the
        resampling (both are linear, so the result is the same): one 1x1 conv
        gives a map per kernel offset (:meth:`offset_weights`), and only
        those few maps are resampled instead of all C channels
        (:meth:`patches_of_offset_maps`). Traced / exported graphs always
        take this path (:func:`~mmctx.models.utils.size_generic_path`): it
        serves every size, and equals the plain squeeze at the reference
        size up to float rounding.
        """
        generic = size_generic_path(x)
        if not generic and tuple(x.shape[-2:]) == self.feature_size:
            return self.squeeze(x)
        weight = self.offset_weights().view(*self.offset_weights_shape)
        if generic and weight.shape[0] == 1:
            # A conv with one output channel makes torch.export guard on
            # the map's area (> 1, a memory-format check); a weighted
            # channel sum computes the same map without it.
            maps = (x * weight.view(1, -1, 1, 1)).sum(1, keepdim=True)
        else:
            # The fastest 1x1 conv here for so few output maps (oneDNN's
            # conv first copies the NCHW map to a blocked layout)
            maps = pointwise_conv(weight, x)
        return self.patches_of_offset_maps(maps)

    @property
    def offset_weights_shape(self):
        """(ph * pw, C, 1, 1): the squeeze as a 1x1 conv, one output map
        per kernel offset."""
        (ph, pw) = self.squeeze.kernel_size
        return (ph * pw, self.in_channels, 1, 1)

    def offset_weights(self):
        """(ph * pw, C): the squeeze kernel's weights at each offset (i, j)
        of the patch, row i * pw + j."""
        return self.squeeze.weight.permute(2, 3, 0, 1).reshape(
            -1, self.in_channels)

    def patches_of_offset_maps(self, maps):
        """(B, ph * pw, H, W) maps, the channels weighted by each kernel
        offset's weights (without the bias) -> (B, 1, gh, gw) patch values:
        the maps resampled to the reference size, and each patch's pixels
        taken from the map of their offset."""
        (ph, pw), (gh, gw) = self.squeeze.kernel_size, self.grid
        if offset_patch_loops_apply(maps):
            # Without autograd: each map's windows at its own offset summed
            # by C++ loops, one call where the ops below make about ten
            patches = norm_gate.kernels().offset_patches(maps, ph, pw, gh,
                                                         gw)
            return patches + self.squeeze.bias.view(1, 1, 1)
        if offset_pooling_applies(maps, self.feature_size):
            # Off the reference size only the pixels at offset (i, j) of
            # each patch are read from map (i, j): pool them alone, as the
            # pooling's rows for offset i (gh, H) and columns for offset j
            # (gw, W), two small GEMMs per map instead of resampling every
            # map to the reference size.
            rows, cols = _offset_pool_matrices(maps, self.feature_size,
                                               (ph, pw))
            maps = maps.reshape(-1, ph, pw, *maps.shape[-2:])
            patches = torch.einsum('iay,zijyx,jbx->zab', rows, maps, cols)
            return patches + self.squeeze.bias.view(1, 1, 1)
        maps = resample_to(maps, self.feature_size)
        maps = maps.reshape(-1, ph, pw, gh, ph, gw, pw)
        # Map (i, j) contributes its pixels at offset (i, j) of each patch.
        patches = torch.einsum('zijaibj->zab', maps)
        return patches + self.squeeze.bias.view(1, 1, 1)

    def pixel_weights_of_patches(self, patches, size):
        """(B, 1, gh, gw) patch values -> (B, 1, H, W): each pixel of an
        (H, W) map gets its patch's weight."""
        weights = self.mlp(patches.flatten(1)).sigmoid()
        weights = weights.view(patches.shape[0], 1, *self.grid)
        return F.interpolate(weights, size=size, mode='nearest')

    def pixel_weights(self, x):
        """(B, 1, H, W): each pixel's patch weight."""
        return self.pixel_weights_of_patches(self.squeeze_patches(x),
                                             x.shape[-2:])

    def forward(self, x):
        return x * self.pixel_weights(x)

    def forward_residual(self, x, identity):
        """``identity + self(x)``, the weighting and a residual block's add
        in one pass over the map (used by the mmctx bottlenecks)."""
        return pixel_gate_add(x, self.pixel_weights(x), identity)

    def tail_applies(self, norm, z, identity):
        """Whether :meth:`forward_tail` may run here: after a training-mode
        BatchNorm, on contiguous float CPU maps, in eager code
        (:func:`mmctx.models.norm_pixel_gate.applies`)."""
        return norm_pixel_gate.applies(norm, z, identity, self)

    def forward_tail(self, z, identity, norm):
        """``relu(identity + self(norm(z)))`` as one function over C++ row
        loops: a bottleneck's tail in training
        (:mod:`mmctx.models.norm_pixel_gate`). Call only where
        :meth:`tail_applies`."""
        return norm_pixel_gate.norm_pixel_gate_add_relu(z, identity, norm,
                                                        self)

    def inference_tail_applies(self, norm, z, identity):
        """Whether :meth:`forward_inference_tail` may run here: after an
        eval-mode BatchNorm, on contiguous float CPU maps, in eager code
        without autograd
        (:func:`mmctx.models.norm_pixel_gate.inference_applies`)."""
        return norm_pixel_gate.inference_applies(norm, z, identity, self)

    def forward_inference_tail(self, z, identity, norm, in_place=False):
        """``relu(identity + self(norm(z)))`` in inference: the squeeze
        from ``z`` with the norm folded in, then one pass over the map
        (:func:`mmctx.models.norm_pixel_gate.
        norm_pixel_gate_add_relu_inference`), into ``z`` itself with
        ``in_place``. Call only where
        :meth:`inference_tail_applies`."""
        return norm_pixel_gate.norm_pixel_gate_add_relu_inference(
            z, identity, norm, self, in_place)


def offset_patch_loops_apply(maps):
    """Whether :meth:`PatchSpatialInteraction.patches_of_offset_maps` runs
    as C++ loops (``norm_gate.kernels().offset_patches``): eager code that
    autograd does not record, contiguous float32 / float64 CPU maps, the
    loops compiled. Not while tracing: a trace would keep the loops'
    output as a constant (FLOP counters trace the module)."""
    return not (torch.is_grad_enabled() and maps.requires_grad) \
        and not size_generic_path(maps) and not torch.jit.is_tracing() \
        and maps.device.type == 'cpu' \
        and maps.is_contiguous() \
        and maps.dtype in (torch.float32, torch.float64) \
        and norm_gate.kernels() is not None


def offset_pooling_applies(maps, feature_size):
    """Whether :meth:`PatchSpatialInteraction.patches_of_offset_maps` pools
    each offset's pixels alone: eager code off the reference size
    (``size_generic_path`` first: under export a size comparison would
    guard on the input size)."""
    return not size_generic_path(maps) \
        and tuple(maps.shape[-2:]) != tuple(feature_size)


def _offset_pool_matrices(maps, feature_size, patch):
    """Adaptive average pooling of ``maps``' (H, W) to ``feature_size``,
    split by patch offset: (ph, gh, H) rows, the pooling matrix's rows
    i, i + ph, ... for offset i, and likewise (pw, gw, W) columns."""
    return _offset_pool_matrices_of(tuple(maps.shape[-2:]),
                                    tuple(feature_size), tuple(patch),
                                    maps.dtype, maps.device)


@functools.lru_cache(maxsize=64)
def _offset_pool_matrices_of(size, feature_size, patch, dtype, device):
    # Constants of the sizes, dtype and device; kept for the sizes seen
    # last (detection's varying input sizes would grow an unbounded cache),
    # as normal tensors also when first built under inference_mode (which
    # autograd could not save for a later training step)
    with torch.inference_mode(False), torch.no_grad():
        like = torch.empty(0, dtype=dtype, device=device)
        return tuple(
            _pool_matrix(side, out, like).view(-1, step, side).transpose(
                0, 1).contiguous()
            for side, out, step in zip(size, feature_size, patch))
