"""Training-only modules that map student features into the teacher's feature spaces.

Neither is part of the exported student: they exist so the student's own features can be compared
with the frozen teacher's, and are dropped after stage 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from custom.networks.student import sincos_position_embedding


class FeatureProjection(nn.Module):
    """Visual path: a learned 1x1 convolution from a student feature map to a teacher stage's channels."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = nn.Sequential(conv(in_channels, in_channels, 1), nn.GELU(), conv(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class KnowledgeAdapter(nn.Module):
    """Semantic path: cross-attention from the student's final-layer tokens into the teacher's
    image-prompt fusion space, one query set per foreground class.

    The teacher's fusion features are image tokens conditioned on a class's prompt. The student has
    no prompt, so each class gets a learned embedding instead: the queries are the student's tokens
    plus that class embedding (and the token positions), the keys and values are the student's
    tokens; the attended tokens go through an MLP to the teacher's fusion width.

    Args:
        student_dim: channels of the student's last transformer layer.
        teacher_dim: channels of the teacher's fusion features (256 for SAM-family decoders).
        num_classes: foreground classes (one learned query embedding each).
        num_heads: attention heads.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_classes: int, num_heads: int = 4) -> None:
        super().__init__()
        self.class_embed = nn.Parameter(torch.randn(num_classes, teacher_dim) * 0.02)
        self.kv = nn.Linear(student_dim, teacher_dim)
        self.query = nn.Linear(student_dim, teacher_dim)
        self.norm_q = nn.LayerNorm(teacher_dim)
        self.norm_kv = nn.LayerNorm(teacher_dim)
        self.attn = nn.MultiheadAttention(teacher_dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.LayerNorm(teacher_dim),
            nn.Linear(teacher_dim, teacher_dim * 2),
            nn.GELU(),
            nn.Linear(teacher_dim * 2, teacher_dim),
        )

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        """``(B, D_s, *grid)`` student map -> ``(B, C, D_t, *grid)`` predicted fusion features per class."""
        b, _, *grid = student.shape
        tokens = student.flatten(2).transpose(1, 2)  # (B, N, D_s)
        n = tokens.shape[1]
        c, d = self.class_embed.shape
        pos = sincos_position_embedding(list(grid), d).to(tokens)
        kv = self.norm_kv(self.kv(tokens) + pos)  # (B, N, D_t)
        q = self.query(tokens) + pos  # (B, N, D_t)
        q = self.norm_q(q[:, None] + self.class_embed[None, :, None])  # (B, C, N, D_t)
        q = q.reshape(b * c, n, d)
        kv = kv[:, None].expand(b, c, n, d).reshape(b * c, n, d)
        attended, _ = self.attn(q, kv, kv, need_weights=False)
        out = attended + self.mlp(attended)
        return out.reshape(b, c, n, d).transpose(2, 3).reshape(b, c, d, *grid)
