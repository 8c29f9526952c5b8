"""The detector: a VideoMAE-style ViT over the whole video and an ActionFormer-style head on its features.

**The ViT** is laid out the way AdaTAD runs it (notebook 02, section 3): a ``Conv3d`` tubelet embedding
(2 frames x p x p pixels per token), attention inside 16-frame chunks only (cost linear in video length),
an optional adapter after each block that sees the *whole* video, and optional activation checkpointing
(``with_cp``). Layer names follow OpenTAD/VideoMAE (``blocks.N.attn.qkv``, ``q_bias``, ``v_bias``,
``mlp.fc1``, ``fc_norm``): at ViT-S/16 shape the backbone has 21,879,936 parameters, as in the seed's log.

**The head** builds a temporal feature pyramid (level ``l`` has stride ``2**l``) and predicts, per point,
class scores (sigmoid focal loss) and distances to the action's start and end (1D DIoU loss). A point is a
positive for a ground-truth action when it lies within ``center_radius`` strides of the action's centre and
the action's longer side from it falls in the level's regression range, so short actions are learnt on fine
levels and long ones on coarse levels.

Example:
    >>> vit = VideoViT(img_size=32, patch_size=8, in_chans=1, embed_dims=64, depth=2, num_heads=4)
    >>> vit(torch.zeros(2, 1, 32, 32, 32)).shape     # (batch, channels, frames, height, width)
    torch.Size([2, 64, 16])
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from qlora_helpers.ch02_tad.evaluate import soft_nms_1d


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


class Block(nn.Module):
    """Pre-norm transformer block, then (optionally) an adapter that sees the whole video."""

    def __init__(self, dims: int, num_heads: int, mlp_ratio: float, *, adapter: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dims, eps=1e-6)
        self.attn = Attention(dims, num_heads)
        self.norm2 = nn.LayerNorm(dims, eps=1e-6)
        hidden = int(dims * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dims, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dims)))
        self.adapter = adapter

    def forward(self, x: torch.Tensor, t: int, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        if self.adapter is not None:
            x = self.adapter(x, t, h, w)
        return x


class VideoViT(nn.Module):
    """VideoMAE-style ViT over a long video, attending within ``num_frames``-frame chunks.

    ``adapter`` is a factory ``(embed_dims) -> nn.Module`` called once per block; ``None`` gives the plain
    backbone. ``forward`` takes ``(batch, channels, frames, height, width)`` with frames a multiple of
    ``num_frames`` and returns spatially averaged features ``(batch, embed_dims, frames / tubelet_size)``.
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
        for name, m in self.named_modules():
            if "adapter" not in name.split("."):   # adapters initialise their own layers: zero up_proj, LoRA B
                self._init(m)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if type(m) is nn.Linear:
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


# --------------------------------------------------------------------------- the head
class TemporalConv(nn.Module):
    """A kernel-3 temporal convolution on channels-last input ``[batch, steps, channels]``, written as
    one linear layer over each step and its two neighbours (CPU-friendly; same function as Conv1d)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.linear = nn.Linear(3 * cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (0, 0, 1, 1))
        window = torch.cat([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], dim=-1)
        return self.linear(window[:, ::self.stride])


def conv_norm(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """TemporalConv -> LayerNorm -> ReLU."""
    return nn.Sequential(TemporalConv(cin, cout, stride), nn.LayerNorm(cout), nn.ReLU())


class TADHead(nn.Module):
    def __init__(self, in_dims: int, num_classes: int, *, dims: int = 64, levels: int = 4,
                 regression_ranges=((0, 4), (4, 8), (8, 16), (16, 10_000)), center_radius: float = 1.5,
                 prior: float = 0.01):
        super().__init__()
        if len(regression_ranges) != levels:
            raise ValueError(f"head: {levels} levels need {levels} regression_ranges, got {len(regression_ranges)}")
        self.num_classes, self.levels, self.center_radius = num_classes, levels, center_radius
        self.regression_ranges = [tuple(map(float, r)) for r in regression_ranges]
        self.proj = nn.Sequential(conv_norm(in_dims, dims), conv_norm(dims, dims))
        self.down = nn.ModuleList(conv_norm(dims, dims, stride=2) for _ in range(levels - 1))
        self.cls_tower = nn.Sequential(conv_norm(dims, dims), conv_norm(dims, dims))
        self.reg_tower = nn.Sequential(conv_norm(dims, dims), conv_norm(dims, dims))
        self.cls_out = TemporalConv(dims, num_classes)
        self.reg_out = TemporalConv(dims, 2)
        self.scales = nn.Parameter(torch.ones(levels))
        nn.init.constant_(self.cls_out.linear.bias, -math.log((1 - prior) / prior))

    def forward(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``features`` [batch, dims, steps] -> per level (class logits [b, n, classes], distances [b, n, 2])."""
        x = self.proj(features.transpose(1, 2))          # channels-last from here on
        pyramid = [x]
        for down in self.down:
            pyramid.append(down(pyramid[-1]))
        out = []
        for level, feat in enumerate(pyramid):
            logits = self.cls_out(self.cls_tower(feat))
            dist = F.relu(self.scales[level] * self.reg_out(self.reg_tower(feat)))
            out.append((logits, dist))
        return out

    def points(self, steps: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Centres (in feature steps), strides and regression ranges of every point, levels concatenated."""
        centres, strides, ranges = [], [], []
        n = steps
        for level in range(self.levels):
            stride = 2 ** level
            centres.append((torch.arange(n, dtype=torch.float32) + 0.5) * stride)
            strides.append(torch.full((n,), float(stride)))
            ranges.append(torch.tensor(self.regression_ranges[level]).expand(n, 2))
            n = (n + 1) // 2
        return torch.cat(centres).to(device), torch.cat(strides).to(device), torch.cat(ranges).to(device)

    def assign(self, steps: int, segments: torch.Tensor, labels: torch.Tensor):
        """Targets of one video: class one-hot [points, classes] and distances in strides [points, 2]."""
        centres, strides, ranges = self.points(steps, segments.device)
        cls_t = torch.zeros(len(centres), self.num_classes, device=segments.device)
        reg_t = torch.zeros(len(centres), 2, device=segments.device)
        if len(segments) == 0:
            return cls_t, reg_t, torch.zeros(len(centres), dtype=torch.bool, device=segments.device)
        c = centres[:, None]
        left, right = c - segments[None, :, 0], segments[None, :, 1] - c
        mid = segments.mean(1)[None]
        radius = self.center_radius * strides[:, None]
        near = ((c >= torch.maximum(mid - radius, segments[None, :, 0]))
                & (c <= torch.minimum(mid + radius, segments[None, :, 1])))
        reach = torch.maximum(left, right)
        fits = (reach >= ranges[:, :1]) & (reach <= ranges[:, 1:])
        length = (segments[:, 1] - segments[:, 0])[None].expand_as(left)
        cost = torch.where(near & fits & (left > 0) & (right > 0), length, torch.full_like(length, float("inf")))
        best_cost, best = cost.min(1)
        positive = torch.isfinite(best_cost)
        cls_t[positive, labels[best[positive]]] = 1.0
        reg_t[positive] = (torch.stack([left[positive, best[positive]], right[positive, best[positive]]], 1)
                           / strides[positive, None])
        return cls_t, reg_t, positive

    def loss(self, outputs, segments: list[torch.Tensor], labels: list[torch.Tensor], *, steps: int) -> dict:
        """Focal classification + DIoU regression loss of a batch (segments in feature steps)."""
        logits = torch.cat([o[0] for o in outputs], 1)   # [b, points, classes]
        dist = torch.cat([o[1] for o in outputs], 1)     # [b, points, 2]
        targets = [self.assign(steps, s.to(logits.device), l.to(logits.device)) for s, l in zip(segments, labels)]
        cls_t = torch.stack([t[0] for t in targets])
        reg_t = torch.stack([t[1] for t in targets])
        pos = torch.stack([t[2] for t in targets])
        num_pos = max(int(pos.sum()), 1)
        cls_loss = sigmoid_focal_loss(logits.float(), cls_t).sum() / num_pos
        reg_loss = diou_loss_1d(dist[pos].float(), reg_t[pos]).sum() / num_pos if pos.any() else dist.sum() * 0
        return {"loss": cls_loss + reg_loss, "cls_loss": cls_loss.detach(), "reg_loss": reg_loss.detach(),
                "positives": int(pos.sum())}

    @torch.no_grad()
    def decode(self, outputs, steps: int, *, topk: int = 200, min_score: float = 1e-3) -> list[dict]:
        """Per video: candidate segments (feature steps), scores and labels, before NMS."""
        centres, strides, _ = self.points(steps, outputs[0][0].device)
        logits = torch.cat([o[0] for o in outputs], 1).float()
        dist = torch.cat([o[1] for o in outputs], 1).float()
        out = []
        for b in range(logits.shape[0]):
            scores = logits[b].sigmoid().flatten()
            keep = min(topk, scores.numel())
            top, idx = scores.topk(keep)
            idx, top = idx[top > min_score], top[top > min_score]
            point, label = idx // self.num_classes, idx % self.num_classes
            start = (centres[point] - dist[b, point, 0] * strides[point]).clamp(0, steps)
            end = (centres[point] + dist[b, point, 1] * strides[point]).clamp(0, steps)
            ok = end > start
            out.append({"segments": torch.stack([start, end], 1)[ok].cpu().numpy(),
                        "scores": top[ok].cpu().numpy(), "labels": label[ok].cpu().numpy()})
        return out


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return (alpha * targets + (1 - alpha) * (1 - targets)) * ce * (1 - p_t) ** gamma


def diou_loss_1d(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - IoU + (centre distance / enclosing length)^2 for segments given as (left, right) around a point."""
    pl, pr, tl, tr = pred[:, 0], pred[:, 1], target[:, 0], target[:, 1]
    inter = torch.minimum(pl, tl) + torch.minimum(pr, tr)
    union = pl + pr + tl + tr - inter
    iou = inter / union.clamp(min=eps)
    enclose = torch.maximum(pl, tl) + torch.maximum(pr, tr)
    centre_gap = (pr - pl) / 2 - (tr - tl) / 2
    return 1 - iou + (centre_gap / enclose.clamp(min=eps)) ** 2


class Detector(nn.Module):
    """Backbone (``VideoViT``) + ``TADHead``. Segments go in and come out in *frames*."""

    def __init__(self, backbone: nn.Module, head: TADHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, video: torch.Tensor):
        return self.head(self.backbone(video))

    def loss(self, video: torch.Tensor, segments: list[np.ndarray], labels: list[np.ndarray]) -> dict:
        outputs = self(video)
        tubelet = self.backbone.tubelet_size
        steps = video.shape[2] // tubelet
        seg = [torch.as_tensor(s, dtype=torch.float32) / tubelet for s in segments]
        lab = [torch.as_tensor(l, dtype=torch.long) for l in labels]
        return self.head.loss(outputs, seg, lab, steps=steps)

    @torch.no_grad()
    def detect(self, video: torch.Tensor, *, sigma: float = 0.5, max_keep: int = 100) -> list[dict]:
        """Per video: segments in frames, scores and labels after class-wise Gaussian soft-NMS."""

        tubelet = self.backbone.tubelet_size
        steps = video.shape[2] // tubelet
        out = []
        for cand in self.head.decode(self(video), steps):
            keep, scores = soft_nms_1d(cand["segments"], cand["scores"], sigma=sigma, labels=cand["labels"],
                                       max_keep=max_keep)
            out.append({"segments": cand["segments"][keep] * tubelet, "scores": scores,
                        "labels": cand["labels"][keep]})
        return out
