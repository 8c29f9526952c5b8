"""Temporal IoU, 1D NMS and THUMOS-protocol mAP, in numpy (the protocol ActionFormer and OpenTAD report).

Per class, all detections of all videos are sorted by score; one is a true positive when its tIoU with a
not-yet-matched ground truth of the same class and video reaches the threshold; AP is the area under the
interpolated precision/recall curve; mAP is the mean over classes with ground truth, at tIoU 0.3 to 0.7
and their average.

Example (one ground truth, a perfect and a poor detection):
    >>> gt = [{"video_id": "v", "label_id": 0, "segment": [2.0, 6.0]}]
    >>> det = [{"video_id": "v", "label_id": 0, "segment": [2.0, 6.0], "score": 0.9},
    ...        {"video_id": "v", "label_id": 0, "segment": [5.0, 9.0], "score": 0.5}]
    >>> mean_ap(det, gt)["average"]
    1.0
"""

from __future__ import annotations

import numpy as np

TIOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def tiou(segment, candidates) -> np.ndarray:
    """tIoU of one ``[start, end]`` with each row of ``candidates`` ([n, 2]).

    Example: tiou([0, 4], [[2, 6], [0, 4], [5, 7]]) -> [1/3, 1, 0]
    """
    candidates = np.asarray(candidates, dtype=np.float64).reshape(-1, 2)
    s, e = float(segment[0]), float(segment[1])
    inter = np.clip(np.minimum(e, candidates[:, 1]) - np.maximum(s, candidates[:, 0]), 0, None)
    union = (e - s) + (candidates[:, 1] - candidates[:, 0]) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def soft_nms_1d(segments, scores, *, sigma: float = 0.5, min_score: float = 1e-3, iou_threshold: float | None = None,
                labels=None, max_keep: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian soft-NMS (what ActionFormer uses on THUMOS): instead of dropping a segment that overlaps a
    kept one (of the same label, when ``labels`` is given), multiply its score by ``exp(-tIoU^2 / sigma)``.
    With ``iou_threshold`` it is hard NMS: an overlap above the threshold drops the segment. Returns
    (indices, scores), best first; ties in score keep the earlier index."""
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).copy()
    labels = np.zeros(len(scores), dtype=np.int64) if labels is None else np.asarray(labels)
    alive = scores >= min_score
    keep, kept_scores = [], []
    while alive.any() and (max_keep is None or len(keep) < max_keep):
        i = int(np.flatnonzero(alive)[np.argmax(scores[alive])])
        keep.append(i)
        kept_scores.append(scores[i])
        alive[i] = False
        same = alive & (labels == labels[i])
        overlap = tiou(segments[i], segments[same])
        if iou_threshold is None:
            scores[same] *= np.exp(-overlap ** 2 / sigma)
        else:
            alive[same] = overlap <= iou_threshold
        alive &= scores >= min_score
    return np.array(keep, dtype=np.int64), np.array(kept_scores)


def nms_1d(segments, scores, *, iou_threshold: float = 0.5, labels=None, max_keep: int | None = None) -> np.ndarray:
    """Greedy hard NMS: indices of the kept segments, highest score first.

    Example: segments [[0, 10], [1, 10], [20, 30]], scores [0.9, 0.8, 0.7], threshold 0.5 -> [0, 2]
    """
    return soft_nms_1d(segments, scores, min_score=-np.inf, iou_threshold=iou_threshold, labels=labels,
                       max_keep=max_keep)[0]


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision envelope (each precision replaced by the best at any higher recall)."""
    p = np.concatenate([[0.0], precision, [0.0]])
    r = np.concatenate([[0.0], recall, [1.0]])
    for i in range(len(p) - 2, -1, -1):
        p[i] = max(p[i], p[i + 1])
    steps = np.flatnonzero(r[1:] != r[:-1]) + 1
    return float(np.sum((r[steps] - r[steps - 1]) * p[steps]))


def average_precision(detections: list[dict], ground_truth: list[dict], threshold: float) -> float:
    """AP of one class at one tIoU threshold (``detections`` and ``ground_truth`` of that class only)."""
    if not ground_truth:
        return float("nan")
    if not detections:
        return 0.0
    by_video: dict[str, list[int]] = {}
    for j, g in enumerate(ground_truth):
        by_video.setdefault(g["video_id"], []).append(j)
    gt_segments = np.array([g["segment"] for g in ground_truth], dtype=np.float64)
    matched = np.zeros(len(ground_truth), dtype=bool)
    order = np.argsort([-d["score"] for d in detections], kind="stable")
    tp = np.zeros(len(detections))
    for rank, k in enumerate(order):
        det = detections[k]
        idx = by_video.get(det["video_id"], [])
        if not idx:
            continue
        overlaps = tiou(det["segment"], gt_segments[idx])
        for best in np.argsort(-overlaps, kind="stable"):  # the best free ground truth above threshold
            if overlaps[best] < threshold:
                break
            if not matched[idx[best]]:
                matched[idx[best]] = True
                tp[rank] = 1
                break
    cum_tp = np.cumsum(tp)
    precision = cum_tp / np.arange(1, len(tp) + 1)
    recall = cum_tp / len(ground_truth)
    return interpolated_ap(precision, recall)


def mean_ap(detections: list[dict], ground_truth: list[dict], thresholds=TIOU_THRESHOLDS) -> dict:
    """mAP per tIoU threshold and their average, plus AP per class: ``{"0.3": ..., "average": ..., "per_class": ...}``.

    Items are dicts with ``video_id``, ``label_id``, ``segment`` ([start, end], any time unit) and, for
    detections, ``score``. Classes without ground truth are left out of the mean.
    """
    classes = sorted({g["label_id"] for g in ground_truth})
    table = np.zeros((len(thresholds), len(classes)))
    for c, label in enumerate(classes):
        det = [d for d in detections if d["label_id"] == label]
        gt = [g for g in ground_truth if g["label_id"] == label]
        for t, thr in enumerate(thresholds):
            table[t, c] = average_precision(det, gt, thr)
    per_threshold = table.mean(axis=1) if classes else np.zeros(len(thresholds))
    out = {f"{thr:.1f}": round(float(v), 4) for thr, v in zip(thresholds, per_threshold)}
    out["average"] = round(float(per_threshold.mean()), 4)
    out["per_class"] = {int(label): round(float(table[:, c].mean()), 4) for c, label in enumerate(classes)}
    return out


def random_detections(ground_truth: list[dict], video_ids: list[str], *, duration: float, num_classes: int,
                      per_video: int = 30, seed: int = 0) -> list[dict]:
    """Chance level: ``per_video`` random segments per video with lengths drawn from the ground truth's,
    random classes and random scores. Evaluating them gives the mAP of a detector that knows only how
    long actions are."""
    rng = np.random.default_rng(seed)
    lengths = (np.array([g["segment"][1] - g["segment"][0] for g in ground_truth]) if ground_truth
               else np.array([duration / 8]))
    out = []
    for vid in video_ids:
        length = rng.choice(lengths, per_video)
        start = rng.uniform(0, np.maximum(duration - length, 1e-6))
        for s, l, c, p in zip(start, length, rng.integers(num_classes, size=per_video), rng.random(per_video)):
            out.append({"video_id": vid, "label_id": int(c), "segment": [float(s), float(s + l)], "score": float(p)})
    return out
