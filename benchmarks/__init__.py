"""The course's measurements: GPU memory and speed at real shapes, and the time the course takes.

Each module is a script run from the repository root, e.g. ``python -m benchmarks.memory_validation --quick``;
it writes ``benchmarks/results/<name>.json`` (``qlora_helpers.common.bench.write_benchmark``), which the
chapters and ``tests/test_benchmark_results.py`` read. Scripts that measure one configuration per process
hand its row back with ``qlora_helpers.common.bench.emit`` / ``run_worker``.
"""
