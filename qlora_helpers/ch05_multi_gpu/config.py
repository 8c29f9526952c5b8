"""Chapter 05's YAML training config, read and checked before anything is launched.

``load_config(path)`` returns the config with its numbers as numbers, or stops with one line naming the
file, the line and the key (the workers would otherwise meet it as a ``KeyError`` inside torch-elastic)::

    multi_gpu_cpu.yaml:3: unknown key lora.rank: did you mean lora.r?
    multi_gpu_cpu.yaml:22: training.batch_size must be a whole number >= 1, not 'four'
    multi_gpu_cpu.yaml:5: not valid YAML (mapping values are not allowed here); fix that line

Both sections and what each key holds are in ``SCHEMA``; ``data/configs/multi_gpu_32b.yaml`` explains every key.
No torch here: the notebook's kernel reads the config before it forks the ranks.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from qlora_helpers.ch05_multi_gpu.schedule import PlateauSchedule
from qlora_helpers.errors import did_you_mean

# course optimizer names (qlora_helpers.common.optim.OPTIMIZERS, which imports bitsandbytes: not in this kernel)
OPTIMIZERS = ("adamw", "adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
# section -> key -> (kind, required); kinds: count (whole number >= 1), seed (>= 0), number, fraction ([0, 1)),
# flag, names (a list of module names), optimizer. The plateau rule's own bounds are PlateauSchedule's.
SCHEMA = {
    "lora": {"r": ("count", True), "alpha": ("number", True), "dropout": ("fraction", True),
             "target_modules": ("names", True)},
    "training": {"learning_rate": ("number", True), "min_lr": ("number", True),
                 "lr_reduction_factor": ("number", True), "lr_patience": ("count", True),
                 "improvement_threshold": ("number", True), "min_val_loss": ("number", True),
                 "batch_size": ("count", True), "gradient_accumulation_steps": ("count", True),
                 "num_epochs": ("count", True), "max_length": ("count", False), "warmup_ratio": ("fraction", False),
                 "weight_decay": ("number", False), "max_grad_norm": ("number", False),
                 "optimizer": ("optimizer", False), "gradient_checkpointing": ("flag", False), "seed": ("seed", False)},
}
KNOWN = [f"{section}.{key}" for section, keys in SCHEMA.items() for key in keys]


def _lines(node, prefix: str = "") -> dict:
    """{"training.batch_size": line} for every key of a composed YAML document (lines from 1)."""
    found = {}
    for key, value in getattr(node, "value", []) if isinstance(node, yaml.MappingNode) else []:
        name = f"{prefix}{key.value}"
        found[name] = key.start_mark.line + 1
        found.update(_lines(value, name + "."))
    return found


def _value(kind: str, value):
    """``value`` as ``kind`` wants it, or ``None`` when it is not one (PyYAML reads ``1e-4`` as a string)."""
    if kind in ("count", "seed"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= (kind == "count")
        return value if ok else None
    if kind in ("number", "fraction"):
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            return None
        return number if number is not None and number >= 0 and (kind == "number" or number < 1) else None
    if kind == "flag":
        return value if isinstance(value, bool) else None
    if kind == "optimizer":
        return value if value in OPTIMIZERS else None
    names = isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
    return list(value) if names else None


WANTS = {"count": "a whole number >= 1", "seed": "a whole number >= 0", "number": "a number >= 0 (e.g. 1e-4)",
         "fraction": "a number in [0, 1) (e.g. 0.05)", "flag": "true or false",
         "optimizer": f"one of {', '.join(OPTIMIZERS)}", "names": "a list of module names, e.g. [q_proj, v_proj]"}


def check_config(data, source: str, lines: dict | None = None) -> dict:
    """``data`` (a parsed config) checked against ``SCHEMA``: a copy with numbers as numbers, or a ValueError of
    one line ``source:LINE: ...`` for the first unknown key, missing key or value of the wrong kind."""
    lines = lines or {}
    at = lambda name: f"{source}:{lines[name]}" if name in lines else source
    if not isinstance(data, dict):
        raise ValueError(f"{source}: must hold the sections {', '.join(SCHEMA)}, not {type(data).__name__}; "
                         "see data/configs/multi_gpu_32b.yaml")
    for name in [s for s in data if s not in SCHEMA] + [f"{s}.{k}" for s in SCHEMA if isinstance(data.get(s), dict)
                                                        for k in data[s] if k not in SCHEMA[s]]:
        hint = did_you_mean(name, KNOWN + list(SCHEMA), "see data/configs/multi_gpu_32b.yaml for every key")
        raise ValueError(f"{at(name)}: unknown key {name}: {hint}")
    checked = {}
    for section, keys in SCHEMA.items():
        values = data.get(section)
        if not isinstance(values, dict):
            raise ValueError(f"{at(section)}: needs a section '{section}:' holding {', '.join(keys)}")
        checked[section] = {}
        for key, (kind, required) in keys.items():
            if key not in values:
                if required:
                    raise ValueError(f"{at(section)}: section {section} lacks {key} ({WANTS[kind]}): add it")
                continue
            value = _value(kind, values[key])
            if value is None:
                raise ValueError(f"{at(f'{section}.{key}')}: {section}.{key} must be {WANTS[kind]}, "
                                 f"not {values[key]!r}")
            checked[section][key] = value
    try:
        PlateauSchedule.from_config(checked["training"], total_steps=1)   # the rule's bounds (min_lr < rate, ...)
    except ValueError as err:     # "training.min_lr = ... is not valid: ..."
        raise ValueError(f"{at(str(err).split(' ', 1)[0])}: {err}") from None
    return checked


def load_config(path: str | Path) -> dict:
    """The YAML config at ``path``, checked (``check_config``); every problem is one line naming the file."""
    path = Path(path)
    if not path.is_file():
        where = "a folder" if path.is_dir() else f"not found (looked in {path.resolve()})"
        raise FileNotFoundError(f"config {path}: {where}; give a YAML file such as data/configs/multi_gpu_cpu.yaml")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                         "save it as UTF-8") from None
    try:
        data, lines = yaml.safe_load(text), _lines(yaml.compose(text))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"{path}{line}: not valid YAML ({problem}); fix that line") from None
    return check_config(data, str(path), lines)
