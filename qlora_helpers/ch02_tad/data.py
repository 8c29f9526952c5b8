"""Untrimmed videos made of real images, with THUMOS-style annotations, deterministic from a seed.

THUMOS14 cannot be downloaded here, so each video is a grey-scale crop of a real photograph drifting like a
hand-held camera, with sensor noise; during each action a real LFW face or handwritten digit moves in the
way that defines the class (``CLASSES``; notebook 02, section 1, shows them). Half the videos also hold a
still, unannotated *distractor*, so appearance alone does not find the actions: the detector has to see
motion. Faces, non-faces and digits are split into disjoint train and validation pools; every frame and
annotation follows from ``VideoSpec`` (its ``seed`` included): the same spec gives the same bytes anywhere.

Example:
    >>> data = make_dataset(VideoSpec(n_train=4, n_val=2, frames=64, max_len=24), write_json=False)
    >>> data.videos["train"].shape, data.videos["train"].dtype
    ((4, 64, 32, 32), dtype('uint8'))
    >>> sorted(data.database["database"])[:1]
    ['video_train_0000']
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qlora_helpers.common.assets import cache_dir, load_images
from qlora_helpers.common.files import atomic_write_json

CLASSES = ("face_slides_right", "face_slides_left", "digit_rises", "face_zooms_in")
PRETRAIN_KINDS = ("face", "nonface", "digit")
SPLITS = ("train", "val")
SUBSET = {"train": "training", "val": "validation"}  # the ActivityNet/THUMOS json field
BACKGROUNDS = ("camera", "astronaut", "coffee", "chelsea", "china", "flower")


@dataclass(frozen=True)
class VideoSpec:
    """Everything that decides the data set: change a field and you get a different, cached set."""

    frames: int = 128       # frames per untrimmed video
    size: int = 32          # frame height and width in pixels
    fps: float = 8.0        # nominal frame rate: annotations are in seconds, like THUMOS
    n_train: int = 192      # training videos
    n_val: int = 64         # validation videos
    min_len: int = 12       # shortest action, frames
    max_len: int = 40       # longest action, frames
    max_actions: int = 3    # actions per video: 1 .. max_actions, never overlapping
    sprite: int = 14        # side of a face or digit in pixels
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def validate(self) -> None:
        if self.frames % 16:
            raise ValueError(f"VideoSpec.frames={self.frames}: use a multiple of 16 "
                             "(the ViT attends over 16-frame chunks)")
        if not 8 <= self.sprite <= self.size // 2:
            raise ValueError(f"VideoSpec.sprite={self.sprite}: use 8 .. size/2 = {self.size // 2} pixels")
        if not 4 <= self.min_len <= self.max_len <= self.frames // 2:
            raise ValueError(f"VideoSpec: need 4 <= min_len <= max_len <= frames/2, got {self.min_len}, {self.max_len}")


@dataclass
class TADData:
    spec: VideoSpec
    videos: dict                      # split -> uint8 array (videos, frames, size, size)
    video_ids: dict                   # split -> list of ids, in the order of ``videos``
    database: dict                    # the THUMOS-style annotation json
    annotation_path: Path | None = None

    def segments(self, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per video of ``split``: (frame segments [k, 2] as start, end, labels [k])."""
        out = []
        for vid in self.video_ids[split]:
            ann = self.database["database"][vid]["annotations"]
            seg = np.array([a["segment(frames)"] for a in ann], dtype=np.float32).reshape(-1, 2)
            out.append((seg, np.array([a["label_id"] for a in ann], dtype=np.int64)))
        return out

    def ground_truth(self, split: str) -> list[dict]:
        """Flat list of ``{"video_id", "label_id", "segment"}`` in seconds, the evaluator's input."""
        return [{"video_id": vid, "label_id": a["label_id"], "segment": a["segment"]}
                for vid in self.video_ids[split] for a in self.database["database"][vid]["annotations"]]


# --------------------------------------------------------------------------- image pools
def _downscale(img: np.ndarray, factor: int) -> np.ndarray:
    h, w = (img.shape[0] // factor) * factor, (img.shape[1] // factor) * factor
    return img[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def resize(img: np.ndarray, n: int) -> np.ndarray:
    """Bilinear resize of a 2-D image to ``n x n`` (numpy only)."""
    h, w = img.shape

    def axis(src, dst):
        pos = np.clip((np.arange(dst) + 0.5) * src / dst - 0.5, 0, src - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, src - 1), pos - lo

    y0, y1, wy = axis(h, n)
    x0, x1, wx = axis(w, n)
    rows = img[y0] * (1 - wy)[:, None] + img[y1] * wy[:, None]
    return rows[:, x0] * (1 - wx) + rows[:, x1] * wx


def image_pools() -> dict:
    """Real images by split: faces, non-faces, digits (disjoint train/val) and shared backgrounds."""

    imgs = load_images()
    lfw, digits = imgs["lfw"], imgs["digits"] / 16.0
    backgrounds = []
    for name in BACKGROUNDS:
        img = imgs[name].astype(np.float32) / 255.0
        grey = img if img.ndim == 2 else img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        backgrounds.append(_downscale(grey, max(1, min(grey.shape) // 80)))
    return {"train": {"face": lfw[:70], "nonface": lfw[100:170], "digit": digits[:1200]},
            "val": {"face": lfw[70:100], "nonface": lfw[170:200], "digit": digits[1200:]},
            "backgrounds": backgrounds}


# --------------------------------------------------------------------------- rendering
def _background(rng, backgrounds, frames: int, size: int) -> np.ndarray:
    bg = backgrounds[rng.integers(len(backgrounds))]
    vy, vx = rng.uniform(-0.12, 0.12, 2)
    span_y, span_x = bg.shape[0] - size, bg.shape[1] - size
    y0 = rng.uniform(max(0, -vy * frames), max(1, span_y - max(0, vy * frames)))
    x0 = rng.uniform(max(0, -vx * frames), max(1, span_x - max(0, vx * frames)))
    t = np.arange(frames)
    ys = np.clip(np.round(y0 + vy * t), 0, span_y).astype(int)
    xs = np.clip(np.round(x0 + vx * t), 0, span_x).astype(int)
    video = np.stack([bg[y:y + size, x:x + size] for y, x in zip(ys, xs)])
    return 0.15 + 0.45 * video + rng.normal(0, 0.03, video.shape).astype(np.float32)


def _paste(frame: np.ndarray, sprite: np.ndarray, y: int, x: int, alpha: bool) -> None:
    """Draw ``sprite`` with its top-left corner at (y, x), clipped to the frame."""
    s = frame.shape[0]
    n = sprite.shape[0]
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + n, s), min(x + n, s)
    if y0 >= y1 or x0 >= x1:
        return
    patch = sprite[y0 - y:y1 - y, x0 - x:x1 - x]
    if alpha:  # a white pen stroke over the scene
        frame[y0:y1, x0:x1] = frame[y0:y1, x0:x1] * (1 - patch) + patch
    else:
        frame[y0:y1, x0:x1] = patch


def _render_action(video, rng, pool, cls: int, start: int, end: int, n: int) -> None:
    size = video.shape[1]
    free = size - n
    length = end - start
    if cls == 2:
        sprite = resize(pool["digit"][rng.integers(len(pool["digit"]))], n)
    else:
        face = pool["face"][rng.integers(len(pool["face"]))]
        sprite = resize(face, n)
    fixed = int(rng.integers(0, free + 1))
    centre = rng.integers(size // 2 - 4, size // 2 + 5, 2)
    for i in range(length):
        p = i / max(length - 1, 1)
        frame = video[start + i]
        if cls == 0:
            _paste(frame, sprite, fixed, round(p * free), alpha=False)
        elif cls == 1:
            _paste(frame, sprite, fixed, round((1 - p) * free), alpha=False)
        elif cls == 2:
            _paste(frame, sprite, round((1 - p) * free), fixed, alpha=True)
        else:
            side = round(6 + p * (size * 3 // 4 - 6))
            _paste(frame, resize(face, side), int(centre[0]) - side // 2, int(centre[1]) - side // 2, alpha=False)


def _place_segments(rng, spec: VideoSpec) -> list[tuple[int, int, int]]:
    """Up to ``max_actions`` (start, end, class) triples, at least 4 frames apart, inside the video."""
    wanted = int(rng.integers(1, spec.max_actions + 1))
    placed: list[tuple[int, int, int]] = []
    for _ in range(200):
        if len(placed) == wanted:
            break
        length = int(rng.integers(spec.min_len, spec.max_len + 1))
        start = int(rng.integers(2, spec.frames - length - 1))
        if all(start >= e + 4 or start + length + 4 <= s for s, e, _ in placed):
            placed.append((start, start + length, int(rng.integers(len(CLASSES)))))
    return sorted(placed)


def _to_uint8(video: np.ndarray) -> np.ndarray:
    return np.round(np.clip(video, 0, 1) * 255).astype(np.uint8)


def render_video(spec: VideoSpec, pools: dict, *, split: str, index: int) -> tuple[np.ndarray, list]:
    """One untrimmed video (uint8, frames x size x size) and its (start, end, class) segments."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    video = _background(rng, pools["backgrounds"], spec.frames, spec.size)
    pool = pools[split]
    if rng.random() < 0.5:  # a still distractor: present, not an action
        kind = PRETRAIN_KINDS[rng.integers(3)]
        sprite = resize(pool[kind][rng.integers(len(pool[kind]))], spec.sprite)
        length = int(rng.integers(spec.frames // 8, spec.frames * 3 // 8 + 1))
        start = int(rng.integers(0, spec.frames - length))
        y, x = rng.integers(0, spec.size - spec.sprite + 1, 2)
        for t in range(start, start + length):
            _paste(video[t], sprite, int(y), int(x), alpha=kind == "digit")
    segments = _place_segments(rng, spec)
    for start, end, cls in segments:
        _render_action(video, rng, pool, cls, start, end, spec.sprite)
    return _to_uint8(video), segments


def _annotation(spec: VideoSpec, split: str, segments: list) -> dict:
    return {"subset": SUBSET[split], "duration": spec.frames / spec.fps, "fps": spec.fps, "frames": spec.frames,
            "annotations": [{"label": CLASSES[c], "label_id": c,
                             "segment": [round(s / spec.fps, 4), round(e / spec.fps, 4)],
                             "segment(frames)": [s, e]} for s, e, c in segments]}


_CACHE: dict[str, TADData] = {}


def make_dataset(spec: VideoSpec = VideoSpec(), write_json: bool = True) -> TADData:
    """Render (or return the in-memory copy of) the data set of ``spec``.

    With ``write_json`` the annotation file is also written, atomically, to
    ``<cache>/tad/data-<key>/annotations.json``: the same layout as THUMOS14 in ActionFormer/OpenTAD
    (``database -> video id -> subset, duration, fps, annotations[segment, label, label_id]``).
    """
    spec.validate()
    if spec.key() in _CACHE:
        return _CACHE[spec.key()]
    pools = image_pools()
    videos, ids, database = {}, {}, {}
    for split in SPLITS:
        count = spec.n_train if split == "train" else spec.n_val
        ids[split] = [f"video_{split}_{i:04d}" for i in range(count)]
        rendered = [render_video(spec, pools, split=split, index=i) for i in range(count)]
        empty = np.zeros((0, spec.frames, spec.size, spec.size), np.uint8)
        videos[split] = np.stack([v for v, _ in rendered]) if rendered else empty
        for vid, (_, segments) in zip(ids[split], rendered):
            database[vid] = _annotation(spec, split, segments)
    doc = {"version": f"synthetic-tad-{spec.key()}", "classes": list(CLASSES), "spec": asdict(spec),
           "database": database}
    data = TADData(spec, videos, ids, doc)
    if write_json:
        data.annotation_path = atomic_write_json(cache_dir() / "tad" / f"data-{spec.key()}" / "annotations.json", doc)
    _CACHE[spec.key()] = data
    return data


def make_pretrain_clips(count: int, spec: VideoSpec = VideoSpec(), seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Short 16-frame clips for pre-training, labelled ``kind * 5 + motion`` (15 classes).

    Kinds are face / non-face / digit, motions still / right / left / up / down: a small stand-in for the
    Kinetics clips VideoMAE-S is fine-tuned on. Only training-pool images are used, and there is no zoom,
    so the detection task still has something new to learn.
    """
    pools = image_pools()
    clips = np.empty((count, 16, spec.size, spec.size), np.uint8)
    labels = np.empty(count, np.int64)
    free = spec.size - spec.sprite
    for i in range(count):
        rng = np.random.default_rng([spec.seed, 7, seed, i])
        video = _background(rng, pools["backgrounds"], 16, spec.size)
        kind, motion = int(rng.integers(3)), int(rng.integers(5))
        pool = pools["train"][PRETRAIN_KINDS[kind]]
        sprite = resize(pool[rng.integers(len(pool))], spec.sprite)
        speed = rng.uniform(0.6, free / 15)
        y, x = (float(v) for v in rng.integers(0, free + 1, 2))
        dy, dx = {0: (0, 0), 1: (0, speed), 2: (0, -speed), 3: (-speed, 0), 4: (speed, 0)}[motion]
        y = min(max(y, -dy * 15), free - dy * 15) if dy else y
        x = min(max(x, -dx * 15), free - dx * 15) if dx else x
        for t in range(16):
            _paste(video[t], sprite, round(y + dy * t), round(x + dx * t), alpha=kind == 2)
        clips[i], labels[i] = _to_uint8(video), kind * 5 + motion
    return clips, labels
