"""The UnCoL student: a 4-layer plain ViT encoder with a U-Net (2D) or V-Net-style (3D) decoder.

SimpleViT-style encoder (conv patch embedding, fixed sin-cos position embedding computed for the
input's own token grid, no class token) built from MONAI's ``TransformerBlock``; UNETR-style skip
paths (MONAI ``UnetrPrUpBlock``/``UnetrUpBlock``) read the outputs of transformer layers 1-3, layer 4
is the bottleneck, and a full-resolution conv stem gives the last skip. The decoder uses plain
double-conv blocks (U-Net) by default in 2D and residual conv blocks (V-Net style) in 3D.

``full_resolution="single"`` makes the full-resolution level cheap: the stem and the last up level are
one 3x3 convolution (with norm and activation) each instead of a pair of blocks. That level costs the
most in 3D (per voxel it is as wide as the levels below but has 8x their voxels); research/results.md
(``inference-speed``, ``switch-probes``) has its time and its Dice.

``forward`` returns logits only, so the network exports to TorchScript and needs no prompt.
``forward_features`` also returns the named intermediate features the distillation paths read.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import (
    Convolution,
    TransformerBlock,
    UnetOutBlock,
    UnetrBasicBlock,
    UnetrPrUpBlock,
    UnetrUpBlock,
)
from monai.networks.layers import Conv

PATCH_SIZE = 16  # four 2x up-sampling stages bring the token grid back to full resolution
FEATURE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")
FULL_RESOLUTION = ("blocks", "single")


def sincos_position_embedding(grid: list[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos position embedding for a token grid of any size: ``(1, prod(grid), dim)``.

    Each spatial axis gets ``dim / len(grid)`` channels, half sines, half cosines of the token's
    index along that axis at geometrically spaced frequencies (SimpleViT's scheme, in N-d).
    """
    n_axes = len(grid)
    per_axis = dim // (2 * n_axes)
    omega = 1.0 / (temperature ** (torch.arange(per_axis, dtype=torch.float32) / per_axis))
    axes = [torch.arange(n, dtype=torch.float32) for n in grid]
    mesh = torch.meshgrid(axes, indexing="ij")
    parts: list[torch.Tensor] = []
    for coord in mesh:
        angles = coord.flatten()[:, None] * omega[None, :]
        parts.append(torch.sin(angles))
        parts.append(torch.cos(angles))
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:  # widths not divisible by 2 * len(grid): the spare channels stay zero
        emb = torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
    return emb[None]


def single_conv(spatial_dims: int, in_channels: int, out_channels: int, norm_name: str) -> nn.Module:
    """One 3x3 convolution, norm and leaky ReLU: the full-resolution level of ``full_resolution="single"``."""
    act = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
    return Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, norm=norm_name, act=act)


class UnCoLStudent(nn.Module):
    """Student segmentation network (see module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes including background.
        hidden_size: transformer width; divisible by ``num_heads`` and by ``2 * spatial_dims``.
        mlp_dim: transformer MLP width.
        num_heads: attention heads.
        num_layers: transformer depth (4 in the paper; layers 1-3 feed skips, the last is the bottleneck).
        feature_size: channels of the full-resolution stem; the decoder doubles it per level.
        decoder: ``"unet"`` (plain conv blocks) or ``"vnet"`` (residual conv blocks); ``None`` picks
            ``"unet"`` in 2D and ``"vnet"`` in 3D.
        norm_name: normalisation of the conv blocks.
        dropout_rate: transformer dropout.
        full_resolution: ``"blocks"`` (the decoder's conv blocks, as at every other level) or ``"single"``
            (one convolution in the stem and one in the last up level; see the module docstring).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 3,
        hidden_size: int = 192,
        mlp_dim: int = 768,
        num_heads: int = 3,
        num_layers: int = 4,
        feature_size: int = 16,
        decoder: str | None = None,
        norm_name: str = "instance",
        dropout_rate: float = 0.0,
        full_resolution: str = "blocks",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if num_layers < 4:
            raise ValueError(f"num_layers must be >= 4 (three skip layers and a bottleneck), got {num_layers}.")
        if hidden_size % num_heads or hidden_size % (2 * spatial_dims):
            raise ValueError(
                f"hidden_size {hidden_size} must be divisible by num_heads ({num_heads}) and 2*spatial_dims."
            )
        decoder = decoder or ("unet" if spatial_dims == 2 else "vnet")
        if decoder not in ("unet", "vnet"):
            raise ValueError(f"decoder must be 'unet' or 'vnet', got {decoder!r}.")
        if full_resolution not in FULL_RESOLUTION:
            raise ValueError(f"full_resolution must be one of {FULL_RESOLUTION}, got {full_resolution!r}.")
        res = decoder == "vnet"
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden_size = hidden_size
        self.mlp_dim = mlp_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.feature_size = feature_size
        self.decoder = decoder  # these settings are what a checkpoint's training record names
        self.full_resolution = full_resolution
        self.patch_size = PATCH_SIZE
        # skips come from the transformer layers spread evenly before the last (1, 2, 3 for depth 4)
        self.skip_layers = [num_layers * k // 4 for k in (1, 2, 3)]

        self.patch_embed = Conv[Conv.CONV, spatial_dims](in_channels, hidden_size, PATCH_SIZE, stride=PATCH_SIZE)
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate, use_flash_attention=True)
                for _ in range(num_layers)
            ]
        )
        for block in self.blocks:  # MONAI builds this norm even without cross-attention; it is never used here
            block.norm_cross_attn.requires_grad_(False)
        self.norm = nn.LayerNorm(hidden_size)
        fs, sd, nn_ = feature_size, spatial_dims, norm_name
        if full_resolution == "single":
            self.stem = single_conv(sd, in_channels, fs, nn_)
        else:
            self.stem = UnetrBasicBlock(sd, in_channels, fs, 3, 1, nn_, res_block=res)
        self.skip1 = UnetrPrUpBlock(sd, hidden_size, fs * 2, 2, 3, 1, 2, nn_, res_block=res)
        self.skip2 = UnetrPrUpBlock(sd, hidden_size, fs * 4, 1, 3, 1, 2, nn_, res_block=res)
        self.skip3 = UnetrPrUpBlock(sd, hidden_size, fs * 8, 0, 3, 1, 2, nn_, res_block=res)
        self.up4 = UnetrUpBlock(sd, hidden_size, fs * 8, 3, 2, nn_, res_block=res)
        self.up3 = UnetrUpBlock(sd, fs * 8, fs * 4, 3, 2, nn_, res_block=res)
        self.up2 = UnetrUpBlock(sd, fs * 4, fs * 2, 3, 2, nn_, res_block=res)
        self.up1 = UnetrUpBlock(sd, fs * 2, fs, 3, 2, nn_, res_block=res)
        if full_resolution == "single":  # the up-sampled features and the stem's, through one convolution
            self.up1.conv_block = single_conv(sd, fs * 2, fs, nn_)
        self.head = UnetOutBlock(sd, fs, out_channels)

    def _tokens_to_grid(self, tokens: torch.Tensor, grid: list[int]) -> torch.Tensor:
        b = tokens.shape[0]
        return tokens.transpose(1, 2).reshape([b, self.hidden_size] + grid)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder features by name: ``stem`` (full resolution) and ``layer1``..``layerN`` as token
        grids of shape ``(B, hidden_size, *input_shape / 16)``; the last layer is layer-normed."""
        spatial = list(x.shape[2:])
        for n in spatial:
            if n % self.patch_size:
                raise ValueError(
                    f"input spatial shape {spatial} must be a multiple of the patch size {self.patch_size}"
                )
        grid = [n // self.patch_size for n in spatial]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = tokens + sincos_position_embedding(grid, self.hidden_size).to(tokens)
        feats: dict[str, torch.Tensor] = {"stem": self.stem(x)}
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i + 1 == self.num_layers:
                tokens = self.norm(tokens)
            feats[f"layer{i + 1}"] = self._tokens_to_grid(tokens, grid)
        return feats

    def decode(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits from the encoder features (the U-Net/V-Net decoder)."""
        l1, l2, l3 = (feats[f"layer{i}"] for i in self.skip_layers)
        d = self.up4(feats[f"layer{self.num_layers}"], self.skip3(l3))
        d = self.up3(d, self.skip2(l2))
        d = self.up2(d, self.skip1(l1))
        d = self.up1(d, feats["stem"])
        return self.head(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.forward_features(x))
