"""A VideoMAE-style ViT over a long video, laid out the way AdaTAD runs it (notebook 02, section 3).

A ``Conv3d`` tubelet embedding (2 frames x p x p pixels per token), attention inside 16-frame chunks only
(cost linear in video length), an optional adapter after each block that sees the *whole* video, and
optional activation checkpointing (``with_cp``). Layer names follow OpenTAD/VideoMAE (``blocks.N.attn.qkv``,
``q_bias``, ``v_bias``, ``mlp.fc1``, ``fc_norm``): at ViT-S/16 shape the backbone has 21,879,936
parameters, as in the seed's training log.

Example:
    >>> vit = VideoViT(img_size=32, patch_size=8, in_chans=1, embed_dims=64, depth=2, num_heads=4)
    >>> vit(torch.zeros(2, 1, 32, 32, 32)).shape     # (batch, channels, frames, height, width)
    torch.Size([2, 64, 16])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def sinusoid_table(positions: int, dims: int) -> torch.Tensor:
    """The fixed 1D sine-cosine position table of VideoMAE: [1, positions, dims]."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -2 * (torch.arange(dims) // 2).double() / dims)[None, :]
    angle = pos * freq
    table = torch.where(torch.arange(dims) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class Attention(nn.Module):
    """Multi-head self-attention with VideoMAE's separate q and v biases (k has none)."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        if dims % num_heads:
            raise ValueError(f"embed_dims={dims} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dims, 3 * dims, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dims))
        self.v_bias = nn.Parameter(torch.zeros(dims))
        self.proj = nn.Linear(dims, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x)  # a plain or a quantized linear; the bias is added here either way
        qkv = qkv + torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias]).to(qkv.dtype)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dims, hidden), nn.GELU(), nn.Linear(hidden, dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block, then (optionally) an adapter that sees the whole video."""

    def __init__(self, dims: int, num_heads: int, mlp_ratio: float, *, adapter: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dims, eps=1e-6)
        self.attn = Attention(dims, num_heads)
        self.norm2 = nn.LayerNorm(dims, eps=1e-6)
        self.mlp = Mlp(dims, int(dims * mlp_ratio))
        self.adapter = adapter

    def forward(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        if self.adapter is not None:
            x = self.adapter(x, t, h, w)
        return x


class VideoViT(nn.Module):
    """VideoMAE-style ViT over a long video, attending within ``num_frames``-frame chunks.

    ``adapter`` is a factory ``(embed_dims) -> nn.Module`` called once per block; ``None`` gives the
    plain backbone. ``forward`` takes
    ``(batch, channels, frames, height, width)`` with frames a multiple of ``num_frames`` and returns
    spatially averaged features ``(batch, embed_dims, frames / tubelet_size)``.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 8, in_chans: int = 1, *, embed_dims: int = 64,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, num_frames: int = 16,
                 tubelet_size: int = 2, adapter: Callable[[int], nn.Module] | None = None, with_cp: bool = False):
        super().__init__()
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}, and num_frames "
                             f"{num_frames} of tubelet_size {tubelet_size}")
        self.embed_dims, self.patch_size, self.tubelet_size = embed_dims, patch_size, tubelet_size
        self.num_frames, self.with_cp = num_frames, with_cp
        self.patch_embed = nn.Conv3d(in_chans, embed_dims, (tubelet_size, patch_size, patch_size),
                                     stride=(tubelet_size, patch_size, patch_size))
        grid = img_size // patch_size
        self.register_buffer("pos_embed", sinusoid_table(grid * grid * num_frames // tubelet_size, embed_dims),
                             persistent=False)
        self.blocks = nn.ModuleList(Block(embed_dims, num_heads, mlp_ratio, adapter=adapter and adapter(embed_dims))
                                    for _ in range(depth))
        self.fc_norm = nn.LayerNorm(embed_dims, eps=1e-6)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if type(m) is nn.Linear:  # adapters initialise their own layers
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _embed(self, x: torch.Tensor):
        """The tubelet ``Conv3d`` (kernel = stride) written as one matrix product: same numbers, and far
        faster than a strided 3D convolution on a CPU."""
        n, c, frames, height, width = x.shape
        kt, p = self.tubelet_size, self.patch_size
        t, h, w = frames // kt, height // p, width // p
        x = x.reshape(n, c, t, kt, h, p, w, p).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(n, t * h * w, c * kt * p * p)
        weight = self.patch_embed.weight.reshape(self.embed_dims, -1)
        return F.linear(x, weight.to(x.dtype), self.patch_embed.bias.to(x.dtype)), (t, h, w)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, c, frames, height, width = video.shape
        if frames % self.num_frames:
            raise ValueError(f"video has {frames} frames: use a multiple of num_frames={self.num_frames}")
        chunks = frames // self.num_frames
        x = video.reshape(b, c, chunks, self.num_frames, height, width).transpose(1, 2)
        x = x.reshape(b * chunks, c, self.num_frames, height, width)
        x, (t, h, w) = self._embed(x)                       # [b*chunks, t*h*w, dims]
        if x.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"frames of {height}x{width} px do not match the position table: build the ViT with "
                             f"img_size={height}")
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            if self.with_cp and torch.is_grad_enabled():
                x = checkpoint(block, x, chunks * t, h, w, use_reentrant=False)
            else:
                x = block(x, chunks * t, h, w)
        x = x.reshape(b, chunks * t, h * w, self.embed_dims).mean(2)   # average over space
        return self.fc_norm(x).transpose(1, 2)              # [b, dims, frames / tubelet]

    def clip_features(self, clips: torch.Tensor) -> torch.Tensor:
        """One pooled vector per ``num_frames``-frame clip, for clip-level pre-training."""
        return self.forward(clips).mean(2)

