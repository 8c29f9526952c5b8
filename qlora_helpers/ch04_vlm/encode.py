"""A checked record -> the model's inputs, with the loss on the assistant's tokens only.

The processor does all the model-specific work: its chat template writes the conversation with
image placeholders, and ``processor(text, images)`` expands each placeholder to as many image
tokens as the vision tower will produce (LLaVA-1.5: 576; Qwen2-VL: one per 28 x 28 pixels).

Labels: ``-100`` everywhere except the assistant turns. Where a turn starts and ends is found by
rendering the conversation up to it (``add_generation_prompt=True``) and up to its end, so any
chat template works as long as it writes turns one after another.

Example (tiny LLaVA, one face question)::

    USER: <image><image><image><image>\\nIs this a face? ASSISTANT: No<|im_end|>
    labels: -100 ...                                              No<|im_end|>
"""

from __future__ import annotations

import torch
from PIL import Image

IGNORE = -100


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


def _images_in(messages: list) -> int:
    return sum(p["type"] == "image" for m in messages for p in m["content"])


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
