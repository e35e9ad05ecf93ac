"""Retrieval throughput and latency: BM25 and dense, in-process and through the HTTP server.

    python benchmarks/retrieval.py --quick            # 300 documents, well under a minute on CPU
    python benchmarks/retrieval.py                    # ~100k documents (dense encoding takes a while)
    python benchmarks/retrieval.py --workdir /tmp/rb  # keep (and later reuse) the built indexes

The corpus is the synthetic world (one document per entity) and the queries are its questions.
For each index kind, client (in-process / server) and batch size (1, 64, 512 queries per call)
it reports queries/s and the p50/p99 latency of one call. Progress goes to stderr; the last
line on stdout is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import requests

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from dgpo_jax.data.synthetic import generate_world, write_world  # noqa: E402
from dgpo_jax.retrieval import HttpRetriever, InProcessRetriever  # noqa: E402
from retrieval_service.corpus import file_sha256  # noqa: E402
from retrieval_service.index import IndexManifest, build_index  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostinfo import cpu_machine  # noqa: E402 (benchmarks/hostinfo.py, beside this file)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """The retrieval server in a subprocess."""

    def __init__(self, index_dir: str, log_path: str, max_queries: int, torch_threads: int | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.started = time.perf_counter()
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
        }
        with open(log_path, "wb") as handle:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "retrieval_service.serve",
                    "--index",
                    index_dir,
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                    f"--max-queries={max_queries}",
                ]
                + ([f"--torch-threads={torch_threads}"] if torch_threads else []),
                cwd=REPO_ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self, timeout_s: float = 300.0) -> float:
        """Seconds from launch until /health answered."""
        while True:
            if self.process.poll() is not None:
                with open(self.log_path, errors="replace") as handle:
                    raise RuntimeError(f"server exited:\n{handle.read()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return time.perf_counter() - self.started
            except requests.ConnectionError:
                pass
            if time.perf_counter() - self.started > timeout_s:
                raise RuntimeError(f"server not ready after {timeout_s} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def measure(
    retriever, queries: list[str], batch_size: int, seconds: float, min_calls: int, max_calls: int
) -> dict:
    """Calls `retriever.retrieve` on consecutive batches until both `seconds` and `min_calls` are met."""

    def batch(call: int) -> list[str]:
        start = (call * batch_size) % len(queries)
        return [queries[(start + i) % len(queries)] for i in range(batch_size)]

    retriever.retrieve(batch(0)[:8])  # warm-up (connections, caches)
    latencies = []
    began = time.perf_counter()
    while len(latencies) < max_calls and (
        len(latencies) < min_calls or time.perf_counter() - began < seconds
    ):
        queries_now = batch(len(latencies) + 1)
        started = time.perf_counter()
        results = retriever.retrieve(queries_now)
        latencies.append(time.perf_counter() - started)
        assert len(results) == batch_size
    total = sum(latencies)
    return {
        "calls": len(latencies),
        "queries_per_s": round(batch_size * len(latencies) / total, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 3),
    }


def reusable(index_dir: str, corpus_sha256: str) -> bool:
    try:
        return IndexManifest.read(index_dir).corpus_sha256 == corpus_sha256
    except (ValueError, OSError):
        return False


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small corpus, short timings (CI)")
    parser.add_argument("--num-docs", type=int, default=None, help="default 100000 (quick: 300)")
    parser.add_argument("--kinds", default="bm25,dense")
    parser.add_argument("--batch-sizes", default="1,64,512")
    parser.add_argument(
        "--seconds", type=float, default=None, help="time per case (default 10; quick 0.3)"
    )
    parser.add_argument(
        "--workdir", default=None, help="keep indexes here and reuse them when the corpus matches"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch CPU threads for dense encoding, in-process and in the server "
        "(0: torch's default; 1 is fastest on small shared CPUs)",
    )
    args = parser.parse_args(argv)
    num_docs = args.num_docs or (300 if args.quick else 100_000)
    seconds = args.seconds if args.seconds is not None else (0.3 if args.quick else 10.0)
    min_calls, max_calls = (1, 200) if args.quick else (5, 2000)
    torch_threads = args.torch_threads or None
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    began = time.perf_counter()
    # A SIGTERM unwinds through `finally`, so the server subprocesses are stopped too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    workdir = args.workdir or tempfile.mkdtemp(prefix="retrieval-bench-")
    os.makedirs(workdir, exist_ok=True)
    servers: dict[str, Server] = {}
    report = {
        "benchmark": "retrieval",
        "mode": "quick" if args.quick else "full",
        "num_documents": num_docs,
        "batch_sizes": batch_sizes,
        "kinds": kinds,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_threads,
        "machine": cpu_machine(),
        "python": platform.python_version(),
        "build_seconds": {},
        "server_ready_seconds": {},
        "results": [],
    }
    try:
        world = generate_world(seed=args.seed, num_entities=num_docs)
        paths = write_world(world, workdir)
        queries = [row["question"] for row in world.train + world.test]
        corpus_sha256 = file_sha256(paths["corpus.jsonl"])
        log(
            f"world: {len(world.corpus)} documents, {len(queries)} questions ({time.perf_counter() - began:.1f} s)"
        )
        for kind in kinds:  # one kind at a time, so that nothing else competes for the CPU
            index_dir = os.path.join(workdir, f"index_{kind}")
            if reusable(index_dir, corpus_sha256):
                log(f"{kind}: reusing {index_dir}")
                report["build_seconds"][kind] = None
            else:
                log(f"{kind}: building index")
                manifest = build_index(
                    paths["corpus.jsonl"],
                    index_dir,
                    kind,
                    overwrite=True,
                    batch_size=64,
                    show_progress=True,
                    torch_threads=torch_threads,
                )
                report["build_seconds"][kind] = manifest.build_seconds
            for client in ("in_process", "server"):
                if client == "in_process":
                    retriever = InProcessRetriever(index_dir, torch_threads=torch_threads)
                else:
                    servers[kind] = Server(
                        index_dir,
                        os.path.join(workdir, f"server_{kind}.log"),
                        max_queries=max(batch_sizes),
                        torch_threads=torch_threads,
                    )
                    report["server_ready_seconds"][kind] = round(servers[kind].wait_ready(), 2)
                    retriever = HttpRetriever(
                        servers[kind].url,
                        timeout=300,
                        deadline=600,
                        max_batch_size=max(batch_sizes),
                    )
                for batch_size in batch_sizes:
                    result = {
                        "kind": kind,
                        "client": client,
                        "batch_size": batch_size,
                        **measure(retriever, queries, batch_size, seconds, min_calls, max_calls),
                    }
                    report["results"].append(result)
                    log(
                        f"{kind:6s} {client:10s} batch {batch_size:4d}: {result['queries_per_s']:10.1f} q/s  "
                        f"p50 {result['p50_ms']:9.2f} ms  p99 {result['p99_ms']:9.2f} ms  ({result['calls']} calls)"
                    )
                del retriever
            servers.pop(kind).stop()
    finally:
        for server in servers.values():
            server.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report["total_seconds"] = round(time.perf_counter() - began, 1)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
