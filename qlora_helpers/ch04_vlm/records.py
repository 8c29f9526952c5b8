"""Image-chat JSONL for the ``vlm`` command: read, check every line, encode; the course's example files.

One line is one training example: an image (or several) and a conversation about it::

    {"image": "faces/lfw-017.png", "messages": [
        {"role": "user", "content": "Is this a face?"},
        {"role": "assistant", "content": "Yes"}]}

``"images": [...]`` takes several images; a relative path is relative to the JSONL file. The images go where
``{"type": "image"}`` parts of a ``content`` list say, one per image, else at the start of the first user
turn. Contents come back as lists of parts (``[{"type": "image"}, {"type": "text", "text": ...}]``), the
form the chat templates of LLaVA, Qwen2-VL and Idefics3 all read. A bad line stops the run before any model
loads, with one line naming the file, the line and the fix:
``train.jsonl:7: image faces/x.png not found (looked in /data/faces/x.png); fix the path``.
Not handled: videos, image URLs, tool calls.

``encode``: the processor does the model-specific work: its chat template writes the conversation with
image placeholders, and ``processor(text, images)`` expands each to as many image tokens as the vision tower
produces (LLaVA-1.5: 576; Qwen2-VL: one per 28 x 28 pixels). Labels are ``-100`` except on the assistant
turns, found by rendering the conversation up to each turn (``add_generation_prompt=True``) and up to its
end, so any chat template that writes turns one after another works. Tiny LLaVA, one face question::

    USER: <image><image><image><image>\\nIs this a face? ASSISTANT: No<|im_end|>
    labels: -100 ...                                              No<|im_end|>

The course's examples (``write_example_files``): no image-caption pairs can be had offline, but two labelled
image sets can (see ``assets``), so the questions and answers come from the labels: LFW images,
``Is this a face?`` ``Yes`` / ``No``; digits, ``Which digit is this?`` ``0`` ... ``9``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from qlora_helpers.ch03_sft.data import data_file, jsonl_lines
from qlora_helpers.common.assets import load_images
from qlora_helpers.common.files import atomic_write_text, claim_course_files

ROLES = ("system", "user", "assistant")
IGNORE = -100


@dataclass(frozen=True)
class Record:
    images: tuple            # paths, in the order their image parts appear
    messages: list           # contents as lists of parts
    where: str               # "train.jsonl:7", for messages about this example


def _parts(content, where: str) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) and p.get("type") in ("image", "text")
                                                for p in content):
        raise ValueError(f"{where}: content must be a string or a list of {{\"type\": \"text\"|\"image\"}} parts, "
                         f"not {json.dumps(content)[:60]}; fix that message")
    return [p if p["type"] == "text" else {"type": "image"} for p in content]


def _images_in(messages: list) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


def _text(parts: list) -> str:
    return "".join(p.get("text") or "" for p in parts if p["type"] == "text")


def check_messages(messages, where: str) -> list:
    """The messages with list contents; one-line ``ValueError`` for an unknown role, no answer, an empty answer."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}; add the conversation")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} has unknown role {role!r}; use one of {', '.join(ROLES)}")
        parts = _parts(message.get("content"), f"{where}: message {i}")
        if role == "assistant" and not _text(parts).strip():
            raise ValueError(f"{where}: message {i} is an empty assistant answer; write the answer or drop the turn")
        out.append({"role": role, "content": parts})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: no assistant turn, so nothing to learn; add "
                         "{\"role\": \"assistant\", \"content\": \"...\"} after the question")
    return out


def _image_paths(row: dict, folder: Path, where: str) -> tuple:
    names = row.get("images", row.get("image"))
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: give \"image\": \"path.png\" or \"images\": [\"a.png\", ...]")
    paths = []
    for name in names:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise ValueError(f"{where}: image {name} not found (looked in {path}); fix the path")
        try:
            with Image.open(path) as im:
                im.verify()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{where}: image {name} cannot be read ({type(err).__name__}); "
                             "replace it with a PNG or JPEG file") from None
        paths.append(path)
    return tuple(paths)


def _place_images(messages: list, n: int, where: str) -> list:
    """Put ``n`` image parts at the start of the first user turn, unless the messages place them."""
    placed = _images_in(messages)
    if placed == 0:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise ValueError(f"{where}: no user turn to show the image in; add one before the answer")
        first["content"] = [{"type": "image"}] * n + first["content"]
    elif placed != n:
        raise ValueError(f"{where}: {n} image(s) given but {placed} {{\"type\": \"image\"}} part(s); "
                         "make them match")
    return messages


def parse_line(text: str, folder: Path, where: str) -> Record:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}, column {err.colno}); fix the line") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be one JSON object with 'image' and 'messages'")
    messages = check_messages(row.get("messages"), where)
    images = _image_paths(row, folder, where)
    return Record(images, _place_images(messages, len(images), where), where)


def read_records(path: str | Path, setting: str = "--data_path") -> list[Record]:
    """Every line of an image-chat JSONL file, checked (images opened, roles, answers); blank lines skipped.
    ``setting``: the option that named the file, for the line a missing file gets."""
    path = data_file(path, setting)
    records = [parse_line(t, path.parent, f"{path}:{n}") for n, t in jsonl_lines(path) if t.strip()]
    if not records:
        raise ValueError(f"{path}: no examples; add one JSON line per image and conversation")
    return records


# --------------------------------------------------------------------------- a record -> the model's inputs
def image_token_id(processor) -> int | None:
    token = getattr(processor, "image_token", None)
    return processor.tokenizer.convert_tokens_to_ids(token) if token else None


def text_tokens(ids: torch.Tensor, processor) -> int:
    """Tokens of ``ids`` that are not image tokens (what ``data.max_length`` bounds)."""
    image_id = image_token_id(processor)
    return int((ids != image_id).sum()) if image_id is not None else ids.numel()


def _render(processor, messages: list, images: list, *, prompt: bool) -> dict:
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    return processor(text=[text], images=[images] if images else None, return_tensors="pt")   # a batch of one


def encode(record, processor, max_length: int) -> dict:
    """The record's model inputs (batch of one) with ``labels``; one-line ``ValueError`` if too long."""
    images = [Image.open(p).convert("RGB") for p in record.images]
    inputs = _render(processor, record.messages, images, prompt=False)
    ids = inputs["input_ids"][0]
    labels = torch.full_like(ids, IGNORE)
    for i, message in enumerate(record.messages):
        if message["role"] != "assistant":
            continue
        shown = images[:_images_in(record.messages[:i])]
        start = _render(processor, record.messages[:i], shown, prompt=True)["input_ids"][0]
        done = record.messages[:i + 1]     # the whole conversation is ``ids`` already: not rendered again
        end = len(ids) if len(done) == len(record.messages) else len(
            _render(processor, done, images[:_images_in(done)], prompt=False)["input_ids"][0])
        if not torch.equal(ids[:len(start)], start):
            raise ValueError(f"{record.where}: the chat template does not write turn {i} after the ones before it; "
                             "use a model whose template renders turns in order")
        labels[len(start):end] = ids[len(start):end]
    n_text = text_tokens(ids, processor)
    if n_text > max_length:
        raise ValueError(f"{record.where}: {n_text} text tokens > data.max_length {max_length}; "
                         "shorten the conversation or raise --data.max_length")
    return {**inputs, "labels": labels[None]}


def encode_all(records: list, processor, max_length: int) -> list[dict]:
    return [encode(r, processor, max_length) for r in records]


def answer_tokens(example: dict) -> int:
    """Tokens that count in the loss (each label predicts the token after it: the first one never counts)."""
    return int((example["labels"][:, 1:] != IGNORE).sum())


# --------------------------------------------------------------------------- the course's examples
QUESTIONS = {"face": "Is this a face?", "digit": "Which digit is this?"}
ANSWERS = {"face": ("Yes", "No"), "digit": tuple(str(d) for d in range(10))}


def _png(pixels, path: Path, size: int) -> str:
    """Save a grayscale array in [0, 1] as an RGB PNG of ``size`` x ``size`` pixels; returns its file name."""
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype("uint8")).convert("RGB")
    image.resize((size, size), Image.Resampling.BILINEAR).save(path)
    return path.name


def _labelled_images() -> list[tuple]:
    """``(kind, pixels in [0, 1], answer, file name)`` of every LFW image and digit."""
    images = load_images()
    faces = [("face", x, "Yes" if f else "No", f"lfw-{i:03d}.png")
             for i, (x, f) in enumerate(zip(images["lfw"], images["lfw_is_face"]))]
    digits = [("digit", x / 16, str(int(t)), f"digit-{i:04d}.png")
              for i, (x, t) in enumerate(zip(images["digits"], images["digits_target"]))]
    return faces + digits


def _balanced(group: list, n: int) -> list:
    """``n`` items of ``group`` with each answer as often as ``n`` allows (in the answers' order)."""
    by_answer = {}
    for item in group:
        by_answer.setdefault(item[2], []).append(item)
    per = max(1, n // len(by_answer))
    return [item for answer in sorted(by_answer) for item in by_answer[answer][:per]][:n]


def example_split(*, held_out: float = 0.2, face_share: float = 1 / 3, n_val: int = 40, seed: int = 0) -> dict:
    """LFW faces/non-faces and digits split into ``train``, ``val`` and ``test`` lists of labelled images.

    A seeded ``held_out`` share of each set never trains: ``test`` is all of it, ``val`` ``n_val`` of it,
    half faces, half digits, each answer as often as the rest. ``train`` repeats the faces until about
    ``face_share`` of its questions are about faces (the yes/no question is learned faster than ten digits),
    shuffled.
    """
    rng = np.random.default_rng(seed)
    split = {"train": {}, "val": [], "test": []}
    items = _labelled_images()
    for kind in QUESTIONS:
        group = [items[i] for i in rng.permutation(len(items)) if items[i][0] == kind]
        n_test = round(held_out * len(group))
        split["test"] += group[:n_test]
        split["val"] += _balanced(group[:n_test], n_val // 2)
        split["train"][kind] = group[n_test:]
    faces, digits = split["train"]["face"], split["train"]["digit"]
    mix = faces * max(1, round(face_share / (1 - face_share) * len(digits) / max(1, len(faces)))) + digits
    split["train"] = [mix[i] for i in rng.permutation(len(mix))]
    return split


def _claim(folder: Path, names: list[str]) -> None:
    """Add ``names`` to the folder's record of course files, refusing (one line) a file there that no earlier call
    wrote (``files.claim_course_files``)."""
    if taken := claim_course_files(folder, names):
        raise ValueError(f"{folder} already holds {', '.join(taken[:3])}, which the course's examples would replace: "
                         "write them into a new or empty folder")


def write_example_files(folder: str | Path, *, n_train: int | None = None, n_val: int = 40, size: int = 56,
                        seed: int = 0, held_out: float = 0.2) -> dict:
    """Write ``example_split``'s images as PNGs and each split as a JSONL file in the format above.

    The question is "Is this a face?" (answer from the LFW label) or "Which digit is this?".
    ``n_train`` keeps the first so many training lines (``None``: all). Returns
    ``{"train": path, "val": path, "test": path}``. A file of the same name that an earlier call did not write
    (``.course_files.json`` lists those) is refused, not replaced.
    """
    folder = Path(folder)
    split = example_split(held_out=held_out, n_val=n_val, seed=seed)
    split["train"] = split["train"][:n_train]
    images = sorted({f"images/{item[3]}" for items in split.values() for item in items})
    _claim(folder, [f"{name}.jsonl" for name in split] + images)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    out, written = {}, set()
    for name, items in split.items():
        rows = []
        for kind, pixels, answer, file in items:
            if file not in written:
                written.add(_png(pixels, folder / "images" / file, size))
            rows.append({"image": f"images/{file}", "messages": [{"role": "user", "content": QUESTIONS[kind]},
                                                                  {"role": "assistant", "content": answer}]})
        out[name] = atomic_write_text(folder / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out


def question_answer(record: Record) -> tuple[str, str]:
    """The first user turn's text and the last answer of a record."""
    user = next(m for m in record.messages if m["role"] == "user")
    return _text(user["content"]).strip(), _text(record.messages[-1]["content"]).strip()


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
