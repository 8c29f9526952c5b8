"""Past one machine: the ``accelerate`` config each node is started with, and two "machines" on this one.

On real nodes every machine runs the same command with its own config file (only ``machine_rank``
differs)::

    accelerate launch --config_file node0.yaml -m qlora_helpers.ch05_multi_gpu.worker --config ... --task forward

``accelerate launch`` starts ``torchrun``, which meets the other machines at ``main_process_ip:port``
and gives each process its ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``, all ``worker.train_worker`` reads.
``run_machines`` starts N such machines as process trees on this host, over loopback with gloo (a second
host needs the network and the firewall open between the nodes on the port).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from qlora_helpers.common.files import atomic_write_json, atomic_write_text


def node_config(machine_rank: int, *, num_machines: int, processes_per_machine: int, main_ip: str,
                port: int | str) -> dict:
    """What ``accelerate config`` writes for one node of a multi-node data-parallel run.

    ``num_processes`` counts every process of every machine. ``mixed_precision`` stays ``no``: the worker
    chooses bf16 or fp16 per GPU itself (``precision.py``); accelerate only starts the processes.
    """
    return {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": num_machines,
            "machine_rank": machine_rank, "num_processes": num_machines * processes_per_machine,
            "main_process_ip": main_ip, "main_process_port": int(port), "rdzv_backend": "static",
            "same_network": True, "gpu_ids": "all", "mixed_precision": "no", "use_cpu": False,
            "downcast_bf16": "no", "main_training_function": "main", "tpu_use_cluster": False, "tpu_use_sudo": False,
            "tpu_env": []}


def node_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def run_machines(run: dict, folder: str | Path, *, machines: int = 2, port: int | str, timeout: float = 600) -> Path:
    """Train ``run`` as ``machines`` machines of one process each on this host; returns the run's output folder.

    Writes ``run.json`` and ``machine{k}.yaml`` into ``folder``, starts every machine's
    ``accelerate launch --config_file machine{k}.yaml -m qlora_helpers.ch05_multi_gpu.worker --run run.json``
    at once (they wait for each other at the rendezvous), and raises with the tail of the first failure.
    """
    folder = Path(folder)
    atomic_write_json(folder / "run.json", run)
    procs = []
    for k in range(machines):
        config = folder / f"machine{k}.yaml"
        atomic_write_text(config, node_yaml(node_config(k, num_machines=machines, processes_per_machine=1,
                                                        main_ip="127.0.0.1", port=port)))
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "-m", "qlora_helpers.ch05_multi_gpu.worker", "--run", str(folder / "run.json")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for k, (p, text) in enumerate(zip(procs, outputs)):
        if p.returncode:
            raise RuntimeError(f"machine {k} failed (exit {p.returncode}): {text[-2000:]}")
    print(*(line for line in outputs[0].splitlines() if line.startswith(("epoch", f"{machines} rank"))), sep="\n")
    return Path(run["output_dir"]) / f"{run['name']}_{run['task']}"

