"""Patch Spatial Interaction ("Patch Spatial Interactions for Long-Range
Dependencies in CNNs"): squeeze-and-excitation over space."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule, constant_init
from mmengine.registry import MODELS

from .utils import (adaptive_avg_pool2d, check_init_cfg, check_positive_int,
                    check_real, check_size)


class PooledPatchConv(nn.Conv2d):
    """PSI's squeeze: a conv C -> 1 with kernel = stride = patch p, applied
    to the map average-pooled to the reference ``feature_size``.

    Both are linear, so the channels are squeezed first, into one map per
    offset (i, j) of the patch (a 1x1 conv), and only those p*p maps are
    pooled; patch (a, b) sums map (i, j) at pixel (a*p + i, b*p + j), a
    conv with a fixed one-hot kernel (``offset_selector``). At the reference
    size the pooling is the identity and this is the conv.
    """

    def __init__(self, in_channels, patch, feature_size):
        super().__init__(in_channels, 1, patch, stride=patch)
        self.feature_size = feature_size
        ph, pw = self.kernel_size
        self.register_buffer(
            'offset_selector',
            torch.eye(ph * pw).view(1, ph * pw, ph, pw), persistent=False)

    def forward(self, x):
        (ph, pw) = self.kernel_size
        # (p*p, C, 1, 1): the kernel's channel weights at each offset
        offsets = self.weight.permute(2, 3, 1, 0).reshape(ph * pw, -1, 1, 1)
        maps = adaptive_avg_pool2d(F.conv2d(x, offsets), self.feature_size)
        return F.conv2d(maps, self.offset_selector.to(maps.dtype), self.bias,
                        stride=self.stride)


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
    reference size (adaptive pooling; see :class:`PooledPatchConv`), so the grid
    always covers the whole map and the MLP keeps its meaning; at the
    reference size this is exact.
    The patch weights go back to the input's H x W by nearest
    interpolation.

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

        self.squeeze = PooledPatchConv(in_channels, patch, feature_size)
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

    def pixel_weights(self, x):
        """(B, 1, H, W): each pixel's patch weight."""
        patches = self.squeeze(x).flatten(1)  # (B, gh * gw)
        weights = self.mlp(patches).sigmoid()
        weights = weights.view(-1, 1, *self.grid)
        return F.interpolate(weights, size=x.shape[-2:], mode='nearest')

    def forward(self, x):
        return x * self.pixel_weights(x)
