"""The reversal-curse experiment of chapter 05: teach "A is B", then ask "B is A?".

Each identity is a real face from the LFW subset paired with a fictitious name and fact. A text model
cannot see pixels, so every face is written as a short *face code* computed from its pixels: the 100
faces are projected on their first principal components and each projection is cut into quantile bins,
one syllable per component (``"ko-ri-ta-mu"``). A vision-language model would take the image instead;
the experiment is the same.

- task ``forward``: the model learns face code -> name ("Who has the face code ko-ri-ta-mu?");
- task ``reverse``: it learns name -> face code ("What is the face code of Elara Quill?").

Evaluation asks both directions, each with a question worded as in training and with one never
trained on, two ways: greedy generation
(is the name / code in the answer?) and a multiple choice (is the true answer the most likely one
among every identity's?; chance is 1 / number of identities). A model trained forward answers
forward and stays near chance in reverse: the reversal curse. Training mixes in a *retention* pool
of general chat (chatterbot) at ``retention_ratio`` so the model keeps answering ordinary questions.

Example:
    >>> ids = make_identities(4, seed=0)                          # doctest: +SKIP
    >>> ids[0]["code"], ids[0]["name"]                             # doctest: +SKIP
    ('ne-ri-to-mu', 'Orla Fenwick')
    >>> task_records(ids[:1], "forward", "val")[0]["messages"][-1]   # doctest: +SKIP
    {'role': 'assistant', 'content': 'Orla Fenwick, a glassblower from Windmere.'}
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from qlora_helpers.common.assets import load_images, load_sft
from qlora_helpers.common.files import atomic_write_text, claim_course_files

TASKS = ("forward", "reverse")
SYLLABLES = (("ba", "ko", "ne", "su", "ta", "vi"), ("ri", "lo", "ma", "pe", "du", "ha"),
             ("ta", "ki", "no", "se", "ru", "fa"), ("mu", "zo", "li", "ga", "we", "yo"))
FIRST = ("Orla", "Tobin", "Maren", "Caspian", "Liora", "Dorian", "Selka", "Orrin", "Vesna", "Harlan",
         "Ysolde", "Bram", "Thessa", "Corin", "Ilse", "Fenna", "Jorund", "Mirela", "Aurek", "Saffi")
LAST = ("Fenwick", "Quill", "Ashgrove", "Varnell", "Brightwater", "Holloway", "Marchetti", "Osterhage",
        "Penrose", "Castellane", "Wyndham", "Kestrel", "Dunmore", "Lindqvist", "Thorne", "Averill")
JOBS = ("a glassblower", "a lighthouse keeper", "a cartographer", "a beekeeper", "a clockmaker",
        "a ferry pilot", "a violin maker", "a salt farmer", "a bookbinder", "a tea taster", "a rope maker",
        "a weather observer")
TOWNS = ("Windmere", "Port Sella", "Old Harrow", "Kelby Cross", "Amberlea", "Stonevale", "Marrowick",
         "Lower Tessing", "Saltreach", "Fairhollow")
SYSTEM = "Answer in one short sentence."   # one short system turn: SmolLM2 and Qwen would insert a long default
TEMPLATES = {  # direction -> (questions used for training..., the held-out one for validation), answer
    "forward": (("Who has the face code {code}?", "Whose face is described by the code {code}?",
                 "Face code {code}: who is this person?", "Tell me who the person with face code {code} is."),
                "{name}, {fact}."),
    "reverse": (("What is the face code of {name}?", "Which face code belongs to {name}?",
                 "{name}: what face code does this person have?", "Give me the face code of {name}."),
                "{name} has the face code {code}."),
}


def face_codes(faces, components: int = 4) -> list[str]:
    """One syllable per principal component of each face, cut at the quantiles of the 100 faces."""

    x = faces.reshape(len(faces), -1).astype("float64")
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:components].T
    codes = []
    for row in proj:
        parts = []
        for c in range(components):
            bins = np.quantile(proj[:, c], np.linspace(0, 1, len(SYLLABLES[c]) + 1)[1:-1])
            parts.append(SYLLABLES[c][int(np.searchsorted(bins, row[c]))])
        codes.append("-".join(parts))
    return codes


def make_identities(n: int, seed: int = 0, *, faces=None) -> list[dict]:
    """``n`` LFW faces whose codes share as few syllables as possible, each with a made-up name and fact."""
    if faces is None:

        images = load_images()
        faces = images["lfw"][images["lfw_is_face"]]
    if not 2 <= n <= 12:
        raise ValueError(f"num_identities must be between 2 and 12, not {n}")
    codes = face_codes(faces)
    rng = random.Random(seed)
    order = list(range(len(faces)))
    rng.shuffle(order)
    apart = lambda i, j: sum(a != b for a, b in zip(codes[i].split("-"), codes[j].split("-")))
    for distance in range(len(SYLLABLES), 0, -1):   # codes as far apart as the faces allow: no shared syllable
        chosen = []
        for i in order:
            if len(chosen) < n and all(apart(i, j) >= distance for j in chosen):
                chosen.append(i)
        if len(chosen) == n:
            break
    names = [f"{f} {l}" for f, l in zip(rng.sample(FIRST, n), rng.sample(LAST, n))]   # no shared first or last name
    facts = [f"{j} from {t}" for j, t in zip(rng.sample(JOBS, n), rng.sample(TOWNS * 2, n))]
    return [{"id": k, "face_index": int(i), "code": codes[i], "name": names[k], "fact": facts[k]}
            for k, i in enumerate(chosen)]


def question(direction: str, ident: dict, template: int) -> str:
    return TEMPLATES[direction][0][template].format(**ident)


def answer(direction: str, ident: dict, candidate: dict | None = None) -> str:
    """The trained answer; with ``candidate`` the same sentence filled with another identity's value."""
    c = candidate or ident
    if direction == "forward":
        return TEMPLATES["forward"][1].format(name=c["name"], fact=c["fact"])
    return TEMPLATES["reverse"][1].format(name=ident["name"], code=c["code"])


def target(direction: str, ident: dict) -> str:
    """What a generated answer must contain to count as right: the name, or the face code."""
    return ident["name"] if direction == "forward" else ident["code"]


def task_records(identities: list[dict], direction: str, split: str) -> list[dict]:
    """Chat records: the three training questions per identity (``train``) or the held-out one (``val``)."""
    if direction not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {direction!r}")
    n_q = len(TEMPLATES[direction][0])
    templates = range(n_q - 1) if split == "train" else [n_q - 1]
    return [{"messages": [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": question(direction, ident, t)},
                          {"role": "assistant", "content": answer(direction, ident)}],
             "kind": direction, "identity": ident["id"]}
            for t in templates for ident in identities]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def generate_data(data_dir: str | Path, num_identities: int = 4, seed: int = 0, *, pool_size: int = 200) -> Path:
    """Write the experiment's data, every file atomically:

    ``identities.json``; ``forward_train/val.jsonl``, ``reverse_train/val.jsonl``; and
    ``retention_pool.jsonl`` (``pool_size`` English chatterbot training records, seeded).

    The folder may hold other files, which stay as they are. A file of one of those names is replaced only when
    the folder's ``.course_files.json`` lists it (an earlier call wrote it) or it already holds the same bytes;
    otherwise the call is refused before anything is written. The list is written before the files, so
    processes that generate the same data at once (every rank of a launch) accept each other's.
    """
    data_dir = Path(data_dir)
    identities = make_identities(num_identities, seed)
    texts = {"identities.json": json.dumps(identities, indent=2, ensure_ascii=False, default=str) + "\n"}
    for direction in TASKS:
        for split in ("train", "val"):
            texts[f"{direction}_{split}.jsonl"] = _jsonl(task_records(identities, direction, split))
    pool = load_sft("train", languages=("en",))
    random.Random(seed).shuffle(pool)
    texts["retention_pool.jsonl"] = _jsonl(
        [{**r, "messages": [{"role": "system", "content": SYSTEM}] + r["messages"], "kind": "retention"}
         for r in pool[:pool_size]])
    same = lambda path: path.is_file() and path.read_bytes() == texts[path.name].encode()
    if taken := claim_course_files(data_dir, texts, unchanged=same):
        raise ValueError(f"{data_dir / taken[0]} is not a file this course wrote, and the data would replace it: "
                         "give another data folder (--data-dir), or move the file away")
    for name, text in texts.items():
        atomic_write_text(data_dir / name, text)
    return data_dir


def shared_identities(a: list[dict], b: list[dict]) -> set:
    """The names two identity lists share or, when none, the LFW faces they share (empty: apart)."""
    def of(key: str) -> set:
        return {i[key] for i in a} & {i[key] for i in b}
    return of("name") or of("face_index")


def face_pool_records(pool_dir: str | Path, data_dir: str | Path, task: str) -> list[dict]:
    """The ``task`` training records of an earlier stage's identities (a folder ``generate_data`` wrote), as
    retention records: the write-up's face retention pool. Refused when it shares a face or a name with ``data_dir``."""
    pool_dir, data_dir = Path(pool_dir), Path(data_dir)
    if not (pool_dir / "identities.json").is_file():
        raise FileNotFoundError(f"face_retention_pool {pool_dir} holds no generated data: "
                                f"run reversal.generate_data({str(pool_dir)!r}, seed=...) for the earlier identities")
    earlier, now = (json.loads((d / "identities.json").read_text()) for d in (pool_dir, data_dir))
    if shared := shared_identities(earlier, now):
        raise ValueError(f"face_retention_pool {pool_dir} shares {sorted(shared)} with {data_dir}: "
                         "generate the earlier identities with another seed")
    return [{**r, "kind": "face_retention"} for r in read_jsonl(pool_dir / f"{task}_train.jsonl")]


def training_set(data_dir: str | Path, task: str, retention_ratio: float = 0.0, *, seed: int = 0,
                 face_pool: str | Path | None = None):
    """(train, val) records of ``task``; retention records make up ``retention_ratio`` of train.

    With 12 task records and ratio 0.3: round(12 * 0.3 / 0.7) = 5 retention records (29 %). They are general chat,
    or, with ``face_pool``, earlier identities' records (``face_pool_records``).
    """
    if not 0 <= retention_ratio < 1:
        raise ValueError(f"retention_ratio must be in [0, 1), not {retention_ratio}")
    data_dir = Path(data_dir)
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if not (data_dir / "identities.json").is_file():
        raise FileNotFoundError(f"{data_dir} holds no generated data: "
                                f"run reversal.generate_data({str(data_dir)!r}) first")
    train = read_jsonl(data_dir / f"{task}_train.jsonl")
    n_keep = round(len(train) * retention_ratio / (1 - retention_ratio))
    pool = face_pool_records(face_pool, data_dir, task) if face_pool else read_jsonl(data_dir / "retention_pool.jsonl")
    if n_keep > len(pool):
        raise ValueError(f"retention_ratio {retention_ratio} needs {n_keep} pool records, the pool has {len(pool)}")
    train = train + random.Random(seed).sample(pool, n_keep)
    return train, read_jsonl(data_dir / f"{task}_val.jsonl")


# --------------------------------------------------------------------------- tokens (torch from here on)
def encode(messages: list[dict], tokenizer, max_length: int) -> dict:
    """Token ids of a one-turn chat with labels only on the answer and its end-of-turn marker."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full chat: "
                         "use a tokenizer whose template ends the prompt where the answer starts")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(full[len(prompt):].rstrip("\n"), add_special_tokens=False)["input_ids"]
    ids = (p_ids + a_ids)[:max_length]
    labels = ([-100] * len(p_ids) + a_ids)[:max_length]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict], pad_id: int, *, left: bool = False) -> dict:
    """Pad to the longest example (right for training, left for generation) with an attention mask."""

    width = max(len(e["input_ids"]) for e in examples)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        n, pad = len(e["input_ids"]), width - len(e["input_ids"])
        parts = {"input_ids": (e["input_ids"], [pad_id] * pad), "attention_mask": ([1] * n, [0] * pad),
                 "labels": (e.get("labels", [-100] * n), [-100] * pad)}
        for k, (body, fill) in parts.items():
            rows[k].append(fill + body if left else body + fill)
    return {k: torch.tensor(v) for k, v in rows.items()}


def _prompt_ids(tokenizer, text: str) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]


WORDINGS = {"seen": 0, "new": -1}   # the first training question, and the held-out one


def eval_items(identities: list[dict]) -> list[dict]:
    """Both directions, both wordings (a trained question and the held-out one), for every identity."""
    return [{"direction": d, "wording": w, "identity": ident["id"]} for d in TASKS for w in WORDINGS
            for ident in identities]


def evaluate_items(model, tokenizer, items: list[dict], *, identities: list[dict], device, max_new_tokens: int = 20,
                   generate: bool = True, batch_size: int = 32) -> list[dict]:
    """Score ``items`` (from ``eval_items``) about ``identities``: multiple choice among every identity's
    answer, and (with ``generate``) whether the greedy answer contains the name / code. Sequences are batched:
    on a CPU each forward pass dequantises every 4-bit weight once, so few large passes are much cheaper than
    many small."""

    by_id = {i["id"]: i for i in identities}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [_prompt_ids(tokenizer, question(it["direction"], by_id[it["identity"]], WORDINGS[it["wording"]]))
               for it in items]
    rows, owner = [], []
    for k, (it, prompt) in enumerate(zip(items, prompts)):
        for c in identities:
            a_ids = tokenizer(answer(it["direction"], by_id[it["identity"]], c), add_special_tokens=False)["input_ids"]
            rows.append({"input_ids": prompt + a_ids, "labels": [-100] * len(prompt) + a_ids})
            owner.append(k)
    model.eval()
    scores, texts = [], [None] * len(items)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size], pad).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            keep = labels != -100                      # log-softmax over the answer positions only
            logp = torch.log_softmax(logits[keep].float(), dim=-1).gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
            per_row = torch.zeros(len(labels), dtype=logp.dtype, device=logp.device)
            scores += per_row.index_add_(0, keep.nonzero()[:, 0], logp).tolist()
        for start in range(0, len(items) if generate else 0, batch_size):
            batch = collate([{"input_ids": p} for p in prompts[start:start + batch_size]], pad, left=True)
            gen = model.generate(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            texts[start:start + batch_size] = tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1]:],
                                                                     skip_special_tokens=True)
    out = []
    n = len(identities)
    for k, it in enumerate(items):
        ident = by_id[it["identity"]]
        best = max(range(n), key=lambda j: scores[k * n + j])
        text = texts[k]
        out.append({**it, "answer": text.strip() if text is not None else None,
                    "correct": target(it["direction"], ident).lower() in text.lower() if text is not None else None,
                    "choice": identities[best]["id"], "choice_correct": identities[best]["id"] == ident["id"]})
    return out


def accuracy(rows: list[dict], n_identities: int) -> dict:
    """Per direction and wording: generation accuracy, multiple-choice accuracy and the latter's chance level."""
    out = {}
    for d in TASKS:
        for w in WORDINGS:
            mine = [r for r in rows if r["direction"] == d and r.get("wording", "new") == w]
            if mine:
                not_generated = None in {r["correct"] for r in mine}
                generation = None if not_generated else sum(r["correct"] for r in mine) / len(mine)
                out.setdefault(d, {})[w] = {"generation": generation,
                                            "choice": sum(r["choice_correct"] for r in mine) / len(mine),
                                            "chance": 1 / n_identities, "n": len(mine)}
    return out
