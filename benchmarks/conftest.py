"""Benchmarks pin torch to a fixed thread count (EVENTFUL_BENCH_THREADS, default 2) so numbers are comparable."""
import os

import torch

THREADS = int(os.environ.get("EVENTFUL_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["torch_threads"] = THREADS
    output_json["torch_version"] = torch.__version__
