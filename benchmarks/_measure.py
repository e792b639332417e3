"""Timing and memory helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import contextlib
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_median(
    fns: dict[str, Callable[[], object]],
    device: str,
    rounds: int,
    warmup: int,
    setups: dict[str, Callable[[], object]] | None = None,
) -> dict:
    """Median seconds of each function, running them in turn each round so that drift hits all alike.

    ``setups[name]``, when given, runs untimed before every call of ``fns[name]`` (e.g. to swap a model's
    attention processors between variants that share the model).
    """
    setups = setups or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            setups.get(name, _nothing)()
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            setups.get(name, _nothing)()
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _nothing() -> None:
    pass


def cuda_graph_replay(fn: Callable[[], object], warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph (after ``warmup`` calls on a side stream); returns its ``replay``.

    Replaying a graph launches the captured kernels without running the Python that issued them, so its time is the
    GPU's alone: what a step costs once the host's launch overhead is gone (CUDA graphs, ``torch.compile``'s
    ``reduce-overhead``). The inputs and outputs are the captured tensors: only for timing.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Builds modules directly in ``dtype`` (no transient fp32 copy), like ``from_pretrained(torch_dtype=...)``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def write_results(path: str | None, result: dict, table: str) -> None:
    """Prints the result as JSON and its markdown table, and writes both next to each other when ``path`` is set."""
    text = json.dumps(result, indent=2)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
        with open(path.removesuffix(".json") + ".md", "w") as f:
            f.write(table + "\n")
    print(text)
    print(table)
