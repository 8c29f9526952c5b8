"""The ``vlm`` command on 7B-shape LLaVA-1.5 and Qwen2-VL folders, under a 7.5 GiB allocator cap.

For each shape, random fp16 weights are written as a ``from_pretrained`` folder with a processor
(no checkpoint can be downloaded here: memory depends on shapes, not values), then a fresh process
caps PyTorch's allocator at 7.5 GiB (``torch.cuda.set_per_process_memory_fraction``: an 8 GB card
less its CUDA context) and trains it through the ``vlm`` command's own parser and ``run_vlm``:
``from_pretrained`` in NF4 with double quantisation, the vision tower in bf16, LoRA r=8 on the
language model, 10 optimizer steps of batch 1 x 2 accumulation, paged 8-bit AdamW, more than
1,024 text tokens per example (a long passage of the chatterbot corpus around each LFW / digits
image). With ``--caps 7.5 11.5`` a shape that runs out of memory under 7.5 GiB runs again under 11.5
GiB (a 12 GB card); an out-of-memory run still records the peak it reached. ``--embeddings_on_cpu``
adds ``--hardware.embeddings_on_cpu`` to the command (the input embedding table in CPU memory: what
lets Qwen2-VL-7B's 152,064-token table leave the 7.5 GiB).

Beside each peak: the chapter-01 estimator's prediction for the same run, through
``ch04_vlm.vram.estimate_vlm`` with the command's fused loss (``loss_rows``: only the answer's rows meet
``lm_head``). What differs from the hub models: LLaVA's vocabulary is SmolLM2's
(49,153 ids with ``<image>``, for Llama's 32,064: no Llama tokenizer is offline), and Qwen2-VL's
images are capped at 336 x 336 pixels (144 image tokens).

    python -m benchmarks.vlm_hf_7b                    # both shapes (GPU)
    python -m benchmarks.vlm_hf_7b --shapes qwen2-vl-7b --work /scratch/vlm
    python -m benchmarks.vlm_hf_7b --shapes qwen2-vl-7b --embeddings_on_cpu

Writes ``benchmarks/results/vlm_hf_7b.json``, keeping the rows of shapes, caps and commands not run this time.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from qlora_helpers.ch04_vlm.command import config_from_args, run_vlm
from qlora_helpers.ch04_vlm.hub_model import (
    cached_tokenizer,
    fit_llava_config,
    load_processor,
    make_processor,
    write_vlm_folder,
)
from qlora_helpers.ch04_vlm.records import encode_all, read_records, write_example_files
from qlora_helpers.ch04_vlm.records import text_tokens as count_text_tokens
from qlora_helpers.ch04_vlm.vram import ANSWER_TOKENS, estimate_vlm
from qlora_helpers.cli import build_parser
from qlora_helpers.common.assets import load_sft
from qlora_helpers.common.bench import WorkerError, command_line, cuda_peak_gib, emit, run_worker, write_benchmark
from qlora_helpers.common.files import read_result_file, repo_root
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import OneLineParser, run_main

SHAPES = {"llava-1.5-7b": "llava", "qwen2-vl-7b": "qwen2_vl"}
IMAGE_SIZE = 336
MAX_LENGTH = 1536          # text tokens allowed per example; the examples hold 1,024+
FLAGS = ["--preset", "ultra_low_memory", "--max_steps", "10", "--eval_steps", "5", "--save_steps", "5",
         "--training.gradient_accumulation_steps", "2", "--data.max_length", str(MAX_LENGTH), "--device", "cuda"]


def write_model(shape: str, folder: Path) -> Path:
    """Random fp16 weights at ``shape`` with its family's processor, as a ``from_pretrained`` folder."""
    if (folder / "config.json").is_file():
        return folder
    family = SHAPES[shape]
    processor = make_processor(family, cached_tokenizer(family), IMAGE_SIZE // 2 if family == "qwen2_vl"
                               else IMAGE_SIZE)
    config = get_config(shape)
    if family == "llava":          # SmolLM2's tokenizer + <image> stands in for Llama's
        fit_llava_config(config, processor.tokenizer)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float16)
    write_vlm_folder(folder, model, processor)
    del model
    torch.cuda.empty_cache()
    return folder


def write_data(folder: Path) -> dict:
    """LFW / digits examples at 336 px, each question preceded by ~1,100 tokens of real English text."""
    paths = write_example_files(folder, n_train=8, n_val=2, size=IMAGE_SIZE)
    pairs = load_sft("train", ("en",))
    passage = " ".join(m["content"] for p in pairs[:400] for m in p["messages"])[:5000]
    for path in (paths["train"], paths["val"]):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            question = row["messages"][0]["content"]
            row["messages"][0]["content"] = f"Read this, then answer the question.\n{passage}\n{question}"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def text_tokens(model: Path, data: Path) -> list[int]:
    processor = load_processor(model)
    return [count_text_tokens(e["input_ids"], processor) for e in encode_all(read_records(data), processor, MAX_LENGTH)]


def command_flags(embeddings_on_cpu: bool) -> list[str]:
    return FLAGS + (["--hardware.embeddings_on_cpu"] if embeddings_on_cpu else [])


def worker(shape: str, model: Path, data: dict, out: Path, cap_gib: float, flags: list[str]) -> None:
    """Train ``model`` through the vlm command with the allocator capped at ``cap_gib``; emit one row."""
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(cap_gib / total)
    argv = ["vlm", "--model_id", str(model), "--data_path", str(data["train"]), "--val_path", str(data["val"]),
            "--output_dir", str(out), "--overwrite_output_dir", *flags]
    run = config_from_args(build_parser("vlm").parse_args(argv))
    row = {"shape": shape, "cap_gib": cap_gib, "command": "python -m qlora_helpers " + " ".join(argv[:1] + flags),
           "text_tokens": text_tokens(model, data["train"])}
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        summary = run_vlm(run, progress=False).summary
        row.update(status="ok", steps=len(summary["history"]["train"]), linear_layers=summary["linear_layers"],
                   train_loss=[r["loss"] for r in summary["history"]["train"]],
                   val_loss=[e["val_loss"] for e in summary["history"]["eval"]], params=summary["params"])
    except torch.OutOfMemoryError:
        row.update(status="out of memory")
    row.update(seconds=round(time.perf_counter() - start, 1), **{f"peak_{k}": v for k, v in cuda_peak_gib().items()})
    settings = run.settings
    row["estimate_gib"] = round(estimate_vlm(shape, settings, max_length=max(row["text_tokens"]),
                                             image_size=IMAGE_SIZE, loss_rows=ANSWER_TOKENS).total_gib, 3)
    emit(row)


def earlier_rows(path: Path, shapes: list, caps: list, command: str) -> list[dict]:
    """The rows of an earlier result file for the shapes, caps and vlm commands not run now
    (each row says which command made it)."""
    if not path.is_file():
        return []
    earlier = read_result_file(path, keys=("figures.runs",), rewrite="python -m benchmarks.vlm_hf_7b")
    return [r for r in earlier["figures"]["runs"]
            if r["shape"] not in shapes or r["cap_gib"] not in caps or r.get("command") != command]


def main(argv=None) -> None:
    parser = OneLineParser(prog="python -m benchmarks.vlm_hf_7b", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--caps", nargs="+", type=float, default=[7.5], help="allocator caps in GiB, tried in order")
    parser.add_argument("--work", default="/tmp/vlm_hf_7b", help="folder for the model folders, data and runs")
    parser.add_argument("--embeddings_on_cpu", action="store_true",
                        help="train with --hardware.embeddings_on_cpu (the input embedding table in CPU memory)")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "CAP_GIB"),
                        help="internal: train one shape under one cap in this process")
    parser.add_argument("--out", help="result file (default: benchmarks/results/vlm_hf_7b.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark measures CUDA memory: run it on a machine with a GPU")
    work = Path(args.work)
    data = {"train": work / "data" / "train.jsonl", "val": work / "data" / "val.jsonl"}
    if args.worker:
        shape, cap = args.worker
        worker(shape, work / shape, data, work / "runs" / f"{shape}-{cap}", float(cap),
               command_flags(args.embeddings_on_cpu))
        return
    write_data(work / "data")
    out = Path(args.out) if args.out else repo_root() / "benchmarks" / "results" / "vlm_hf_7b.json"
    flags = command_flags(args.embeddings_on_cpu)
    command = "python -m qlora_helpers vlm " + " ".join(flags)
    rows, started = earlier_rows(out, args.shapes, args.caps, command), time.perf_counter()
    for shape in args.shapes:
        t0 = time.perf_counter()
        write_model(shape, work / shape)
        write_seconds = round(time.perf_counter() - t0, 1)
        for cap in args.caps:
            try:
                extra = ["--embeddings_on_cpu"] if args.embeddings_on_cpu else []
                row = run_worker("benchmarks.vlm_hf_7b", ["--work", work, *extra, "--worker", shape, cap],
                                 label=shape)[0]
            except WorkerError as err:
                row = {"shape": shape, "cap_gib": cap, "command": command, "status": f"failed: {err}"}
            rows.append({**row, "write_seconds": write_seconds, "run_by": command_line(),
                         "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
            write_benchmark("vlm_hf_7b", {"runs": rows, "wall_seconds": round(time.perf_counter() - started, 1)},
                            out)
            if row.get("status") != "out of memory":
                break


if __name__ == "__main__":
    sys.exit(run_main(main))
