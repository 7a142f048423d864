"""Record what the numbers were measured on, beside pytest-benchmark's own machine info."""

from __future__ import annotations

import os

import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    info = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bench_threads_env": os.environ.get("GROKOPT_BENCH_THREADS"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
        )
    machine_info["grokopt"] = info
