"""Serving throughput and latency: the same model served as MAP only, with a last-layer
KFAC posterior, and with an all-weights KFAC GLM posterior, under a bounded load.

Each configuration is started as a real `laplacefim serve` subprocess on 127.0.0.1; a
client in this process (aiohttp: httpx's async client was itself the bottleneck at 16
connections) sends a fixed number of requests (one input each) from N concurrent
connections and records each request's latency. Reported: requests/s,
inputs/s, p50/p99 latency, the batch sizes the batcher formed (from /v1/stats) and the
number of failed requests; then the issue's targets, as ratios measured in this one run.

    bash benchmarks/setup_bench_env.sh                          # .venv-bench with [serve]
    .venv-bench/bin/python benchmarks/serve.py                   # 3000 requests, 16 clients
    .venv-bench/bin/python benchmarks/serve.py --requests 500 --clients 4 --quick

The server runs torch with one thread (`--threads 1`); the client shares the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from laplacefim import Laplace

MODEL_FILE = """
from torch import nn
def make():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))
"""


def _prepare(directory: Path, quick: bool) -> np.ndarray:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    (directory / "net.py").write_text(MODEL_FILE)
    namespace: dict = {}
    exec(MODEL_FILE, namespace)
    model: nn.Module = namespace["make"]()
    g = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(5 if quick else 30):
        for rows in torch.randperm(1500, generator=g).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimiser.step()
    torch.save(model.state_dict(), directory / "w.pt")
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 1500, 256)]
    val = [(x[1500:1650], y[1500:1650])]
    for name, subset in (("ll", "last_layer"), ("all", "all")):
        la = Laplace(model, "classification", subset=subset, structure="kron")
        la.fit(batches)
        la.tune_prior(prior_structure="layerwise" if subset == "all" else "scalar")
        la.calibrate_abstention(val, target_coverage=0.95)
        la.save(directory / f"{name}.pt")
    return x[1650:].numpy()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(directory: Path, extra: list[str], args: argparse.Namespace) -> tuple:
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "laplacefim",
        "serve",
        "--model",
        f"{directory / 'net.py'}:make",
        "--weights",
        str(directory / "w.pt"),
        "--port",
        str(port),
        "--threads",
        "1",
        "--max-batch",
        str(args.max_batch),
        "--max-wait-ms",
        str(args.max_wait_ms),
        *extra,
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            _get(url + "/health")
            return process, url
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(process.stderr.read()) from None
            time.sleep(0.2)
    raise RuntimeError("server did not start")


async def _load(url: str, inputs: np.ndarray, n_requests: int, n_clients: int) -> dict:
    latencies: list[float] = []
    failed = 0
    counter = iter(range(n_requests))
    connector = aiohttp.TCPConnector(limit=n_clients)
    async with aiohttp.ClientSession(url, connector=connector) as client:

        async def worker() -> None:
            nonlocal failed
            for index in counter:
                body = {"inputs": [inputs[index % len(inputs)].tolist()]}
                start = time.perf_counter()
                async with client.post("/v1/predict", json=body) as response:
                    await response.read()
                    failed += response.status != 200
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(n_clients)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "requests_per_s": n_requests / wall,
        "inputs_per_s": n_requests / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "failed": failed,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="fewer training epochs")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        inputs = _prepare(directory, args.quick)
        configs = {
            "MAP": ["--likelihood", "classification"],
            "LL-KFAC": ["--laplace", str(directory / "ll.pt")],
            "KFAC-GLM": ["--laplace", str(directory / "all.pt")],
        }
        results = {}
        for name, extra in configs.items():
            process, url = _start(directory, extra, args)
            try:
                asyncio.run(_load(url, inputs, min(200, args.requests), args.clients))  # warm-up
                before = _get(url + "/v1/stats")
                results[name] = asyncio.run(_load(url, inputs, args.requests, args.clients))
                after = _get(url + "/v1/stats")
                sizes = {
                    int(k): v - before["inputs_per_batch"].get(k, 0)
                    for k, v in after["inputs_per_batch"].items()
                }
                counts = np.array([k for k, v in sizes.items() for _ in range(v)])
                results[name]["batch_mean"] = float(counts.mean()) if counts.size else 0.0
                results[name]["batch_max"] = int(counts.max()) if counts.size else 0
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
    print(
        f"{args.requests} requests of 1 input, {args.clients} concurrent clients, "
        f"--max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms}"
    )
    header = f"{'config':10} {'req/s':>8} {'inputs/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
    print(header + f"{'p99/p50':>8} {'batch mean':>10} {'max':>5} {'failed':>6}")
    for name, r in results.items():
        print(
            f"{name:10} {r['requests_per_s']:8.1f} {r['inputs_per_s']:9.1f} {r['p50_ms']:8.2f} "
            f"{r['p99_ms']:8.2f} {r['p99_ms'] / r['p50_ms']:8.2f} {r['batch_mean']:10.2f} "
            f"{r['batch_max']:5d} {r['failed']:6d}"
        )
    base = results["MAP"]["requests_per_s"]
    ll = results["LL-KFAC"]["requests_per_s"] / base
    full = results["KFAC-GLM"]["requests_per_s"] / base
    tail = max(r["p99_ms"] / r["p50_ms"] for r in results.values())
    failed = sum(r["failed"] for r in results.values())
    print("\ntargets")
    print(
        f"  last-layer KFAC throughput / MAP  {ll:.2f}  (>= 0.80: {'met' if ll >= 0.8 else 'NOT met'})"
    )
    print(
        f"  all-weights KFAC GLM / MAP        {full:.2f}  (>= 0.25: {'met' if full >= 0.25 else 'NOT met'})"
    )
    print(
        f"  worst p99 / p50                   {tail:.2f}  (<= 3: {'met' if tail <= 3 else 'NOT met'})"
    )
    print(
        f"  failed valid requests             {failed}     (0: {'met' if failed == 0 else 'NOT met'})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
