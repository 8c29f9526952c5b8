"""SFT data: read chat or instruction JSONL, check it, and turn it into masked training examples.

Two record forms are accepted, one JSON object per line:

- chat:        ``{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}``
- instruction: ``{"instruction": "Translate to French", "input": "cat", "output": "chat"}`` (``input`` optional)

Every bad record is reported with its file, line and field, in one line, before any training
starts. A conversation is rendered with the tokenizer's *own* chat template and the loss is
taken only on the assistant's tokens (its answer and the end-of-turn marker); every other
label is ``-100``, which PyTorch's cross-entropy skips.

Example (SmolLM2's template; ``·`` marks a masked token, ``[..]`` a trained one)::

    >>> ex = encode_chat([{"role": "user", "content": "Hi there"},
    ...                   {"role": "assistant", "content": "Hello!"}], tokenizer)   # doctest: +SKIP
    >>> show_mask(ex, tokenizer)[-42:]                                             # doctest: +SKIP
    '·<|im_start|>·ass·istant·\\n[Hello][!][<|im_end|>]·\\n'
"""

from __future__ import annotations

import codecs
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
MAX_REPORTED = 5  # bad records named in the one-line error; the rest are counted
MAX_LINE_BYTES = 2**20  # one conversation per line: 1 MiB is ~250k tokens, far beyond any max_length


class DataError(ValueError):
    """Bad SFT data. ``str(err)`` is one line; ``err.problems`` lists every ``file:line: field: problem``."""

    def __init__(self, problems: list[str], hint: str = ""):
        self.problems = list(problems)
        shown = "; ".join(self.problems[:MAX_REPORTED])
        more = len(self.problems) - MAX_REPORTED
        if more > 0:
            shown += f"; ... and {more} more bad record{'s' if more > 1 else ''}"
        super().__init__(shown + (f" ({hint})" if hint else ""))


FORMS_HINT = ('each line must be {"messages": [{"role": ..., "content": ...}, ...]} '
              'or {"instruction": ..., "input": ..., "output": ...}')


# --------------------------------------------------------------------------- reading and checking
def _check_text(value, where: str, field_name: str, problems: list[str], required: bool = True) -> bool:
    if value is None and not required:
        return True
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        problems.append(f"{where}: field '{field_name}' is {kind}")
        return False
    if required and not value.strip():
        problems.append(f"{where}: field '{field_name}' is empty")
        return False
    return True


def record_to_messages(record, where: str = "record") -> tuple[list[dict] | None, list[str]]:
    """A chat or instruction record as a list of messages, or ``None`` and the problems found."""
    problems: list[str] = []
    if not isinstance(record, dict):
        return None, [f"{where}: a JSON {type(record).__name__}, not an object; {FORMS_HINT}"]
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return None, [f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects"]
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                problems.append(f"{where}: field 'messages[{i}]' is not an object")
                continue
            role = msg.get("role")
            if role not in ROLES:
                problems.append(f"{where}: field 'messages[{i}].role' is {role!r}; use one of {', '.join(ROLES)}")
            _check_text(msg.get("content"), where, f"messages[{i}].content", problems)
        if not problems and not any(m["role"] == "assistant" for m in messages):
            problems.append(f"{where}: field 'messages' has no assistant turn, so there is nothing to learn")
        if problems:
            return None, problems
        return [{"role": m["role"], "content": m["content"]} for m in messages], []
    if "instruction" in record or "output" in record:
        ok = _check_text(record.get("instruction"), where, "instruction", problems)
        ok &= _check_text(record.get("output"), where, "output", problems)
        ok &= _check_text(record.get("input"), where, "input", problems, required=False)
        ok &= _check_text(record.get("system"), where, "system", problems, required=False)
        if not ok:
            return None, problems
        prompt = record["instruction"].strip()
        if (record.get("input") or "").strip():
            prompt += "\n\n" + record["input"].strip()
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
        return messages, []
    keys = ", ".join(sorted(record)) or "none"
    return None, [f"{where}: no 'messages' and no 'instruction'/'output' field (keys: {keys}); {FORMS_HINT}"]


def jsonl_lines(path: Path, limit: int = MAX_LINE_BYTES):
    """``(line number, text)`` of every line, read one at a time: a line longer than ``limit`` bytes is refused
    without being read whole, a line that is not UTF-8 naming its byte (lines end at ``\\n`` only: U+2028 may
    sit inside a JSON string)."""
    offset = 0
    with open(path, "rb") as fh:
        for n, raw in enumerate(iter(lambda: fh.readline(limit + 1), b""), start=1):
            if len(raw.rstrip(b"\r\n")) > limit:
                raise DataError([f"{path}:{n}: line longer than {limit // 2**20} MiB, the limit for one record"],
                                hint="split it into shorter conversations, or remove it") from None
            bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0   # Notepad's, or a joined file's
            try:
                yield n, raw[bom:].decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError([f"{path}:{n}: not UTF-8 (byte 0x{raw[bom + err.start]:02x} at offset "
                                 f"{offset + bom + err.start})"],
                                hint="save the file as UTF-8, e.g. iconv -f latin1 -t utf-8") from None
            offset += len(raw)


def _json(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return err


def data_file(path: str | Path, setting: str = "--data_path") -> Path:
    """``path`` if it is a file; else one line naming ``setting`` (a folder, or nothing there)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a data file; give {setting} a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file; give {setting} a JSONL file")
    return path


def read_jsonl(path: str | Path, setting: str = "--data_path") -> list[list[dict]]:
    """All conversations of a JSONL file; raises ``DataError`` naming every bad line (blank lines are skipped).
    ``setting``: the option that named the file, for the line a missing file gets."""
    path = data_file(path, setting)
    records = [(f"{path}:{n}", _json(line)) for n, line in jsonl_lines(path) if line.strip()]
    return _checked(records, str(path), hint=f"{{}} in {path.name}; fix or remove those lines",
                    empty="the file is empty; add one JSON object per line")


def records_to_conversations(records: list[dict], source: str = "records") -> list[list[dict]]:
    """Like ``read_jsonl`` for records already in memory (``where`` is ``source[index]``)."""
    return _checked([(f"{source}[{i}]", r) for i, r in enumerate(records)], source, empty="nothing to train on")


def _checked(records: list[tuple], source: str, *, hint: str = "", empty: str) -> list[list[dict]]:
    """The conversations of ``(where, record)`` pairs (a record that is a ``JSONDecodeError``: a line that is not
    JSON); every problem raised at once, their count in ``hint``'s ``{}``."""
    conversations, problems = [], []
    for where, record in records:
        if isinstance(record, json.JSONDecodeError):
            problems.append(f"{where}: not valid JSON ({record.msg} at column {record.colno})")
            continue
        messages, found = record_to_messages(record, where)
        problems += found
        if messages is not None:
            conversations.append(messages)
    if problems:
        raise DataError(problems, hint=hint.format(f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"))
    if not conversations:
        raise DataError([f"{source}: no records"], hint=empty)
    return conversations


# --------------------------------------------------------------------------- tokenising with a loss mask
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    position_ids: list[int] | None = None   # packed blocks: positions restart at each conversation

    @property
    def n_trained(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def assistant_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant answer.

    A span starts after the template's assistant header (what ``add_generation_prompt=True``
    appends) and ends after the end-of-turn marker, trailing whitespace excluded. Found by
    rendering growing prefixes of the conversation, so it works for any template whose
    rendering of a prefix is a prefix of the whole (ChatML, Llama, Qwen ...).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no chat template: "
                         "use an instruct/chat model or set tokenizer.chat_template")
    render = tokenizer.apply_chat_template
    text = render(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not text.startswith(head) or not text.startswith(upto):
            raise ValueError("the chat template renders a prefix of the conversation differently from the whole, "
                             "so the assistant tokens cannot be located; use a template without that behaviour")
        end = len(upto.rstrip())
        spans.append((len(head), end))
    return text, spans


def encode_chat(messages: list[dict], tokenizer, max_length: int | None = None) -> Example:
    """Token ids of one conversation and labels that keep only the assistant tokens.

    Truncation keeps the first ``max_length`` tokens and sets ``truncated``.
    """
    text, spans = assistant_spans(messages, tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for pos, (start, end) in enumerate(offsets):
        if end > start and any(s <= start and end <= e for s, e in spans):
            labels[pos] = ids[pos]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels, truncated)


def show_mask(example: Example, tokenizer) -> str:
    """The example as text: trained tokens in ``[brackets]``, masked ones after a ``·``."""
    parts = []
    for tok, lab in zip(example.input_ids, example.labels):
        piece = tokenizer.decode([tok])
        parts.append(f"[{piece}]" if lab != IGNORE_INDEX else f"·{piece}")
    return "".join(parts)


def pack(examples: list[Example], block_size: int) -> list[Example]:
    """Put whole conversations end to end into blocks of at most ``block_size`` tokens, padding-free.

    Each block keeps where its conversations start (``position_ids`` restart at 0), so attention
    stays inside each conversation (``collate`` passes the positions and no mask, and transformers
    builds a block-diagonal causal mask); the first token of each conversation is never a target.
    Fewer, fuller rows and no padding: more learning per step for the same compute.
    """

    blocks = []
    for row in pack_lengths([len(e.input_ids) for e in examples], block_size):
        ids, labels, pos = [], [], []
        for i in row:
            ex = examples[i]
            ids += ex.input_ids
            labels += [IGNORE_INDEX] + list(ex.labels[1:])
            pos += list(range(len(ex.input_ids)))
        block = Example(ids, labels, position_ids=pos)
        if block.n_trained:
            blocks.append(block)
    return blocks


@dataclass
class SFTData:
    """Encoded examples and what happened on the way: counts a learner should see."""

    examples: list[Example]
    n_records: int
    n_truncated: int = 0
    n_dropped: int = 0          # truncation left no assistant token: nothing to learn, dropped
    packed: bool = False
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        s = self.stats
        return (f"{self.n_records} conversations -> {len(self.examples)} examples"
                f"{' (packed)' if self.packed else ''}; {self.n_truncated} truncated, {self.n_dropped} dropped; "
                f"{s.get('tokens', 0):,} tokens, {s.get('trained_tokens', 0):,} trained on")


def encode_all(conversations: list[list[dict]], tokenizer, max_length: int, packing: bool = False) -> SFTData:
    """Encode every conversation; refuses to return nothing."""
    encoded = [encode_chat(c, tokenizer, max_length) for c in conversations]
    kept = [e for e in encoded if e.n_trained]
    data = SFTData(kept, len(conversations), n_truncated=sum(e.truncated for e in encoded),
                   n_dropped=len(encoded) - len(kept))
    if packing:
        data.examples, data.packed = pack(kept, max_length), True
    if not data.examples:
        lost = f"all {len(conversations)} conversations lost every assistant token to max_length={max_length}"
        raise DataError([lost], hint="raise --max_length")
    data.stats = {"tokens": sum(len(e.input_ids) for e in data.examples),
                  "trained_tokens": sum(e.n_trained for e in data.examples),
                  "max_len": max(len(e.input_ids) for e in data.examples)}
    return data


def losses(data: SFTData, max_length: int) -> list[str]:
    """One line for each kind of loss to ``max_length``: conversations cut short, and conversations dropped."""
    lines, cut = [], data.n_truncated - data.n_dropped     # a dropped conversation was cut too
    if cut:
        lines.append(f"data: {cut} of {data.n_records} conversations are longer than max_length={max_length} tokens "
                     "and were cut to it (raise --max_length to keep them whole)")
    if data.n_dropped:
        lines.append(f"data: {data.n_dropped} of {data.n_records} conversations were dropped: max_length="
                     f"{max_length} cut off every assistant token (raise --max_length to train on them)")
    return lines


# --------------------------------------------------------------------------- batching
def batch_order(n: int, batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled index batches of one epoch; a pure function of (seed, epoch), so a resumed run sees the same order."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def collate(examples: list[Example], pad_id: int) -> dict:
    """Right-pad a list of examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Packed blocks (``position_ids`` set) get ``position_ids`` instead of a mask; a shorter block is
    filled up with one unlabelled run of ``pad_id`` whose positions restart at 0, a conversation of
    its own that nothing attends to.
    """

    width = max(len(e.input_ids) for e in examples)
    packed = any(e.position_ids is not None for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    extra = torch.zeros((len(examples), width), dtype=torch.long)   # attention mask, or positions when packed
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        if packed:
            extra[row, :n] = torch.tensor(ex.position_ids if ex.position_ids is not None else range(n))
            extra[row, n:] = torch.arange(width - n)
        else:
            extra[row, :n] = 1
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": extra}
    return {"input_ids": ids, "attention_mask": extra, "labels": labels}


# --------------------------------------------------------------------------- padding-free packing
def pack_lengths(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Group item indices, in order, into rows of at most ``max_tokens`` tokens (none is split)."""
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than max_tokens={max_tokens}: "
                             "raise max_tokens or lower max_length")
        if row and used + n > max_tokens:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows
