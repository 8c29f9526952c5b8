"""An ActionFormer-style detection head (a temporal feature pyramid, per-moment classes and boundary
distances, focal + DIoU losses) and the detector that puts backbone and head together.

Level ``l`` of the pyramid has stride ``2**l``. A point is a positive for a ground-truth action when it lies
within ``center_radius`` strides of the action's centre and the action's longer side from it falls in the
level's regression range, so short actions are learnt on fine levels and long ones on coarse levels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qlora_helpers.ch02_tad.evaluate import soft_nms_1d


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
