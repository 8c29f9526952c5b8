"""Image-question-answer data from real offline images, with answers taken from their labels.

No image-caption pairs can be had offline, but two labelled image sets can (see ``assets``):

=============  ===============================  ===========================================
images         question                         answer (from the label)
=============  ===============================  ===========================================
LFW subset     ``Is this a face?``              ``Yes`` (first 100) / ``No`` (last 100)
digits         ``Which digit is this?``         ``0`` ... ``9``
=============  ===============================  ===========================================

Each image is resized to ``size`` x ``size`` pixels and copied to three channels. A fixed share
of each set is held out (chosen by a seeded shuffle) and never trained on.

Example:
    >>> ex = make_examples(size=24, seed=0)                       # doctest: +SKIP
    >>> ex["train"][0].question, ex["train"][0].answer, ex["train"][0].pixels.shape   # doctest: +SKIP
    ('Which digit is this?', '7', (3, 24, 24))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qlora_helpers.common.assets import load_images

QUESTIONS = {"face": "Is this a face?", "digit": "Which digit is this?"}
CHOICES = {"face": ("Yes", "No"), "digit": tuple(str(d) for d in range(10))}
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Example:
    pixels: object        # float32 array (3, size, size), values in [-1, 1]
    kind: str             # "face" or "digit"
    question: str
    answer: str
    label: int            # class for the vision tower's pre-training: digits 0-9, face 10, not a face 11
    source: str           # "lfw[17]", "digits[1203]"


def _resize(images, size: int):
    """(N, h, w) floats in [0, 1] -> (N, 3, size, size) in [-1, 1], bilinear."""

    x = torch.from_numpy(np.ascontiguousarray(images, dtype="float32"))[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).repeat(1, 3, 1, 1).numpy()


def make_examples(size: int = 24, *, held_out: float = 0.2, seed: int = 0, max_digits: int | None = None) -> dict:
    """``{"train": [...], "test": [...]}`` of ``Example``; faces and digits shuffled together."""


    images = load_images()
    rng = np.random.default_rng(seed)
    out = {"train": [], "test": []}

    def add(kind, pix, answers, labels, sources):
        order = rng.permutation(len(pix))
        n_test = int(round(held_out * len(pix)))
        for rank, i in enumerate(order):
            split = "test" if rank < n_test else "train"
            out[split].append(Example(pix[i], kind, QUESTIONS[kind], answers[i], int(labels[i]), sources[i]))

    faces = images["lfw_is_face"]
    add("face", _resize(images["lfw"], size), ["Yes" if f else "No" for f in faces],
        [10 if f else 11 for f in faces], [f"lfw[{i}]" for i in range(len(faces))])
    digits, target = images["digits"], images["digits_target"]
    if max_digits:
        digits, target = digits[:max_digits], target[:max_digits]
    add("digit", _resize(digits / 16.0, size), [str(int(t)) for t in target], target,
        [f"digits[{i}]" for i in range(len(target))])
    for split in out:
        out[split] = [out[split][i] for i in rng.permutation(len(out[split]))]
    return out


def balanced(examples: list, per_kind: int | None = None, per_answer: int | None = None) -> list:
    """A subset with the same number of examples of each answer, in a fixed order (for evaluation)."""
    by_answer: dict = {}
    for ex in examples:
        by_answer.setdefault((ex.kind, ex.answer), []).append(ex)
    chosen = []
    for (kind, _answer), group in sorted(by_answer.items()):
        n = per_answer or (per_kind // len(CHOICES[kind]) if per_kind else len(group))
        chosen.extend(group[:n])
    return chosen


def training_mix(examples: list, seed: int = 0, face_share: float = 1 / 3) -> list:
    """The training examples, faces repeated until about ``face_share`` of the questions are about faces
    (the yes/no question is learned faster than the ten digits)."""

    faces = [e for e in examples if e.kind == "face"]
    digits = [e for e in examples if e.kind == "digit"]
    reps = max(1, round(face_share / (1 - face_share) * len(digits) / max(1, len(faces))))
    mix = faces * reps + digits
    rng = np.random.default_rng(seed + 1)
    return [mix[i] for i in rng.permutation(len(mix))]


def prompt_text(question: str, n_image_tokens: int) -> str:
    """The chat format of SmolLM2 (``<|im_start|>role ... <|im_end|>``) without its default system line."""
    return (f"<|im_start|>user\n{IMAGE_TOKEN * n_image_tokens}\n{question}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def encode(example: Example, tokenizer, n_image_tokens: int, *, with_answer: bool = True) -> dict:
    """Token ids and labels for one example: only the answer and its end marker are learned (-100 elsewhere)."""
    prompt = tokenizer(prompt_text(example.question, n_image_tokens), add_special_tokens=False)["input_ids"]
    if not with_answer:
        return {"input_ids": prompt, "labels": [-100] * len(prompt)}
    answer = tokenizer(example.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def collate(examples: list, tokenizer, n_image_tokens: int, *, with_answer: bool = True) -> dict:
    """A batch of examples whose prompts have the same length (one question kind): no padding needed."""

    enc = [encode(e, tokenizer, n_image_tokens, with_answer=with_answer) for e in examples]
    lengths = {len(e["input_ids"]) for e in enc}
    if len(lengths) != 1:
        raise ValueError(f"collate needs equal lengths (one question kind per batch), got {sorted(lengths)}")
    ids = torch.tensor([e["input_ids"] for e in enc])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([e["labels"] for e in enc]),
            "pixel_values": torch.from_numpy(np.stack([e.pixels for e in examples]))}


def photos_336(size: int = 336) -> list:
    """The six sample photos (china, flower, astronaut, coffee, chelsea, camera), resized to ``size`` px.

    Returns float32 arrays (3, size, size) normalised with CLIP's mean and std, as LLaVA's processor does.
    """


    images = load_images()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    out = []
    for name in ("china", "flower", "astronaut", "coffee", "chelsea", "camera"):
        img = images[name]
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        x = torch.from_numpy(img[..., :3].astype("float32") / 255.0).permute(2, 0, 1)[None]
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[0]
        out.append(((x.clamp(0, 1) - mean) / std).numpy())
    return out
