"""Image-chat JSONL for the ``vlm`` command: read, check every line, and say what to fix.

One line is one training example: an image (or several) and a conversation about it::

    {"image": "faces/lfw-017.png", "messages": [
        {"role": "user", "content": "Is this a face?"},
        {"role": "assistant", "content": "Yes"}]}

``"images": [...]`` takes several images. A relative path is relative to the JSONL file. Where
the images go in the conversation: ``{"type": "image"}`` parts in a ``content`` list, one per
image; plain-text contents get them at the start of the first user turn. Contents come back as
lists of parts (``[{"type": "image"}, {"type": "text", "text": ...}]``), the form the chat
templates of LLaVA, Qwen2-VL and Idefics3 all read.

A bad line stops the run before any model loads, with one line naming the file, the line and
the fix: ``train.jsonl:7: image faces/x.png not found (looked in /data/faces/x.png); fix the path``.
Not handled: videos, image URLs, tool calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from qlora_helpers.common.assets import load_images
from qlora_helpers.common.files import atomic_write_text

ROLES = ("system", "user", "assistant")


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
    placed = sum(p["type"] == "image" for m in messages for p in m["content"])
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


def read_records(path: str | Path) -> list[Record]:
    """Every line of an image-chat JSONL file, checked (images opened, roles, answers); blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file; give --data_path a JSONL file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 (byte {err.start}); save the file as UTF-8") from None
    records = [parse_line(t, path.parent, f"{path}:{n}") for n, t in enumerate(lines, 1) if t.strip()]
    if not records:
        raise ValueError(f"{path}: no examples; add one JSON line per image and conversation")
    return records


def _png(pixels, path: Path, size: int) -> str:
    """Save a grayscale array in [0, 1] as an RGB PNG of ``size`` x ``size`` pixels; returns its file name."""
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype("uint8")).convert("RGB")
    image.resize((size, size), Image.Resampling.BILINEAR).save(path)
    return path.name


def write_example_files(folder: str | Path, *, n_train: int = 16, n_val: int = 4, size: int = 56,
                        seed: int = 0) -> dict:
    """Write LFW faces/non-faces and digits as PNGs plus ``train.jsonl`` and ``val.jsonl`` in the format above.

    Half the examples ask "Is this a face?" (answer from the LFW label), half "Which digit is this?".
    Returns ``{"train": path, "val": path}``.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, rng = load_images(), np.random.default_rng(seed)
    faces = rng.permutation(len(images["lfw"]))
    digits = rng.permutation(len(images["digits"]))
    rows = []
    for i in range(n_train + n_val):
        if i % 2 == 0:
            j = int(faces[i // 2])
            name = _png(images["lfw"][j], folder / "images" / f"lfw-{j:03d}.png", size)
            question, answer = "Is this a face?", "Yes" if images["lfw_is_face"][j] else "No"
        else:
            j = int(digits[i // 2])
            name = _png(images["digits"][j] / 16, folder / "images" / f"digit-{j:04d}.png", size)
            question, answer = "Which digit is this?", str(int(images["digits_target"][j]))
        rows.append({"image": f"images/{name}", "messages": [{"role": "user", "content": question},
                                                              {"role": "assistant", "content": answer}]})
    out = {}
    for split, part in (("train", rows[:n_train]), ("val", rows[n_train:])):
        out[split] = atomic_write_text(folder / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in part))
    return out
