"""Score a saved chapter-05 adapter on both directions: the evaluation the worker runs, as a command.

    python -m qlora_helpers evaluate --model_path outputs/lfw_reversal_forward/best --task all \\
        --save_examples outputs/lfw_reversal_forward/best_examples.json

``--model_path`` is the ``best/`` or ``final/`` folder of a run. The run folder above it holds
``training_history.json``, which says where the run's data is (``--data_dir`` overrides it), how the base
was quantised and in which dtype the run computed; the adapter's own ``adapter_config.json`` names its base
model (``--base_model`` overrides it). The scores are the worker's (``worker.ask``): the same questions,
the same multiple choice and greedy answers as its evaluation of ``final/``.

It does not evaluate runs on random weights (``tiny:``, ``random:``): those weights were never saved;
save the model first and train on its folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers.utils import logging as hf_logging

from qlora_helpers.ch05_multi_gpu import precision as P
from qlora_helpers.ch05_multi_gpu.learning import reversal_verdict
from qlora_helpers.ch05_multi_gpu.model import load_model
from qlora_helpers.ch05_multi_gpu.reversal import TASKS, WORDINGS
from qlora_helpers.ch05_multi_gpu.worker import ask
from qlora_helpers.common.device import check_device_name
from qlora_helpers.common.files import atomic_write_json
from qlora_helpers.common.models import check_adapter_folder, check_model_folder, load_adapter
from qlora_helpers.errors import UserError

CHOICES = (*TASKS, "all")


def read_run(model_path: str | Path, *, data_dir: str | None = None, base_model: str | None = None) -> dict:
    """What evaluating ``model_path`` needs, checked before any model loads: the base, the data, the dtype."""
    path = Path(model_path)
    fix = "give the best/ or final/ folder of a chapter-05 run (outputs/NAME_TASK/best)"
    if path.is_file():
        raise UserError(f"--model_path {path} is a file, not a folder; {fix}")
    if not path.is_dir():
        raise UserError(f"--model_path {path}: no such folder; {fix}")
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"--model_path {path} holds no adapter_config.json; {fix}")
    adapter = check_adapter_folder(path, setting="--model_path")
    history_file = path.parent / "training_history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else {}
    data = Path(data_dir or history.get("data_dir") or "")
    if not (data / "identities.json").is_file():
        where = f"--data_dir {data}" if data_dir or history.get("data_dir") else f"{history_file} names no data_dir"
        raise UserError(f"{where}: no identities.json there; pass --data_dir, the folder the run trained on")
    base = base_model or adapter.get("base_model_name_or_path")
    if not base_model and history.get("model_id", "").startswith(("tiny:", "random:")):
        raise UserError(f"{path} was trained on random weights ({history['model_id']}), which were not saved; "
                        "pass --base_model, the folder of the model it was trained on")
    if not base:
        raise UserError(f"{path / 'adapter_config.json'} names no base model; pass --base_model, its folder")
    check_model_folder(base, setting="--base_model" if base_model else f"the base of {path}")
    return {"model_path": path, "base": base, "data_dir": data, "trained_task": history.get("task"),
            "quantize": history.get("quantize", "4bit"),
            "compute_dtype": history.get("precision", {}).get("compute_dtype", "fp32")}


def evaluate(model_path: str | Path, task: str = "all", *, data_dir: str | None = None, base_model: str | None = None,
             device_map: str = "auto", max_new_tokens: int = 24) -> dict:
    """Both scores of ``task``'s questions (or all of them) for the adapter at ``model_path``, and every answer;
    ``max_new_tokens=0`` scores the multiple choice only (on a CPU the greedy answers take most of the time)."""
    if task not in CHOICES:
        raise UserError(f"task must be one of {', '.join(CHOICES)}, not {task!r}")
    run = read_run(model_path, data_dir=data_dir, base_model=base_model)
    try:   # the base as the worker trained it (its 4-bit layout on the CPU included)
        model, tokenizer = load_model(run["base"], run["quantize"], dtype=P.torch_dtype(run["compute_dtype"]),
                                      device=device_map)
    except OSError as err:
        raise UserError(f"base model {run['base']!r} of {run['model_path']} cannot be loaded "
                        f"({str(err).splitlines()[0]}); pass --base_model, a local model folder") from err
    model = load_adapter(model, run["model_path"], run["base"])
    identities = json.loads((run["data_dir"] / "identities.json").read_text())
    scores = ask(model, tokenizer, identities, max_new_tokens=max_new_tokens, task=task)
    answers = scores.pop("answers")
    return {"model_path": str(run["model_path"]), "task": task, "trained_task": run["trained_task"],
            "identities": len(identities), "accuracy": scores, "answers": answers}


def report(result: dict) -> str:
    """One line per direction and wording, and the verdict when both directions were asked."""
    lines = [f"{result['model_path']}: {result['identities']} identities (chance 1/{result['identities']})"]
    for d, by_wording in result["accuracy"].items():
        for w in WORDINGS:
            a = by_wording[w]
            generation = "not asked" if a["generation"] is None else f"{a['generation']:.3f}"
            lines.append(f"  {d:<8} {w:<4} wording  choice {a['choice']:.3f}  generation {generation}")
    if result["task"] == "all" and result["trained_task"] in TASKS:
        lines.append(reversal_verdict(result["accuracy"], result["trained_task"], result["identities"])["text"])
    return "\n".join(lines)


def configure_parser(p) -> None:
    p.add_argument("--model_path", required=True, help="the best/ or final/ folder of a chapter-05 run")
    p.add_argument("--task", default="all", choices=CHOICES, help="which direction's questions to ask")
    p.add_argument("--save_examples", default="", metavar="FILE", help="write the scores and every answer here (JSON)")
    p.add_argument("--device_map", default="auto", help="auto (accelerate places the model), cpu, cuda:0, ...")
    p.add_argument("--data_dir", default="", help="default: the data folder the run trained on")
    p.add_argument("--base_model", default="", help="default: the base named in the adapter's config")
    p.add_argument("--max_new_tokens", type=int, default=24, help="0: the multiple choice only, nothing generated")


def cli(args) -> int:
    if args.save_examples and Path(args.save_examples).is_dir():
        raise UserError(f"--save_examples {args.save_examples} is a folder; give a file name (examples.json)")
    if args.max_new_tokens < 0:
        raise UserError(f"--max_new_tokens must be >= 0 (0: the multiple choice only), not {args.max_new_tokens}")
    check_device_name(args.device_map, "--device_map", auto=True)
    hf_logging.disable_progress_bar()
    result = evaluate(args.model_path, args.task, data_dir=args.data_dir or None, base_model=args.base_model or None,
                      device_map=args.device_map, max_new_tokens=args.max_new_tokens)
    print(report(result))
    if args.save_examples:
        atomic_write_json(args.save_examples, result)
        print(f"scores and {len(result['answers'])} answers written to {args.save_examples}")
    return 0
