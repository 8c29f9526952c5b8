"""How much GPU memory does it take to build a real-shape model with random weights?

``qlora_helpers.common.models.build_random`` quantises each linear layer as soon as its random bf16
weight exists, so building a 32B-shape model in 4-bit should peak near the 4-bit model's size
plus one weight matrix, never near the 61 GiB of its bf16 weights. This script measures that
for each shape and quantisation and writes ``benchmarks/results/build_random.json``.

    python -m benchmarks.build_random                      # 0.5B, 7B, 32B; 4-bit and 8-bit
    python -m benchmarks.build_random --shapes qwen2.5-0.5b --quantize 4bit
"""

import gc
import sys
import time

import torch

from qlora_helpers.common.bench import cuda_peak_gib, write_benchmark
from qlora_helpers.common.models import build_random, count_parameters
from qlora_helpers.common.shapes import get_config
from qlora_helpers.errors import OneLineParser, run_main


def main(argv=None) -> None:
    parser = OneLineParser(prog="python -m benchmarks.build_random", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-32b"])
    parser.add_argument("--quantize", nargs="+", default=["4bit", "8bit"])
    parser.add_argument("--out", help="result file (default: benchmarks/results/build_random.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark measures CUDA memory: run it on a machine with a GPU")
    rows = []
    for shape in args.shapes:
        for quantize in args.quantize:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            model = build_random(get_config(shape), quantize=quantize, device="cuda")
            seconds = time.perf_counter() - start
            resident = torch.cuda.memory_allocated() / 2**30
            params = count_parameters(model)["total"]
            rows.append({"shape": shape, "quantize": quantize, "parameters": params,
                         "bf16_weights_gib": round(params * 2 / 2**30, 2),
                         "model_gib": round(resident, 3), **{f"peak_{k}": v for k, v in cuda_peak_gib().items()},
                         "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
            del model
            gc.collect()
    write_benchmark("build_random", {"rows": rows}, args.out)


if __name__ == "__main__":
    sys.exit(run_main(main))
