"""The retrieval server under load, with hostile request bodies mixed in.

    python benchmarks/server_load.py --quick         # under a minute on a 2-core CPU
    python benchmarks/server_load.py                 # 60 s of load (~1.5 minutes in all)
    python benchmarks/server_load.py --duration 120 --clients 8

Builds a small BM25 index of the synthetic world, starts ``python -m retrieval_service.serve``
on a free loopback port with its default limits, and then:

1. baseline (a third of --duration): --clients threads send valid ``/retrieve`` requests;
2. mixed (the rest): the same valid clients, plus, from a second process, --clients threads
   cycling through hostile requests (a declared body far over the limit, a chunked body that
   never ends, malformed JSON, wrong types, nested garbage, deep nesting, invalid UTF-8, lone
   surrogates, a list of a million non-strings, empty / too many queries, an over-long query,
   a client that disconnects mid-body, a wrong content type, unknown paths and methods), slow
   senders (headers, then the body a few bytes at a time: some finish in a few seconds, some
   stall until the server gives up on them) and one client that never finishes its headers.

It reports the HTTP answers by kind, every 5xx (there must be none), whether the server is up
at the end (process alive, a valid request answered), its resident memory (VmRSS, sampled every
20 ms) before / after / at its peak, and the p50/p99 latency of the valid requests in both
phases. Progress goes to stderr; the last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import platform
import queue
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict

import numpy as np
import requests
from hostinfo import cpu_machine  # benchmarks/hostinfo.py, beside this file

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOST = "127.0.0.1"
# What each hostile kind must get (None: no answer expected, the client hung up).
EXPECTED = {
    "huge_body": {413},
    "huge_chunked_body": {413},
    "malformed_json": {400},
    "wrong_types": {422},
    "nested_garbage": {422},
    "deep_nesting": {400},
    "invalid_utf8": {400},
    "lone_surrogates": {200},  # valid JSON: searched with U+FFFD in their place
    "many_non_strings": {422},
    "empty_queries": {422},
    "too_many_queries": {422},
    "long_query": {422},
    "disconnect_mid_body": {None},
    "wrong_content_type": {422},
    "unknown_path": {404},
    "wrong_method": {405},
    "slow_sender": {200},
    "slow_sender_stalled": {408},
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Server:
    """``python -m retrieval_service.serve`` in a subprocess, with its default limits."""

    def __init__(self, index_dir: str, log_path: str):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
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
                    "--host",
                    HOST,
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                cwd=REPO_ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def wait_ready(self, timeout_s: float = 300.0) -> dict:
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log()[-3000:]}")
            try:
                response = requests.get(self.url + "/health", timeout=1)
                if response.status_code == 200:
                    return response.json()
            except requests.ConnectionError:
                pass
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"server not ready after {timeout_s} s")
            time.sleep(0.1)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class MemorySampler(threading.Thread):
    """VmRSS of `pid` every `period_s` seconds; `mark(name)` records the latest sample."""

    def __init__(self, pid: int, period_s: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.period_s = pid, period_s
        self.peak, self.latest, self.marks = 0.0, None, {}
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            value = rss_mb(self.pid)
            if value is not None:
                self.latest = value
                self.peak = max(self.peak, value)
            self.stopping.wait(self.period_s)

    def mark(self, name: str) -> None:
        self.marks[name] = rss_mb(self.pid)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


class Tally:
    """Thread-safe counts of answers, exceptions and notes, by kind."""

    def __init__(self):
        self.lock = threading.Lock()
        self.status = defaultdict(Counter)
        self.exceptions = defaultdict(Counter)
        self.notes = defaultdict(list)

    def answer(self, kind: str, status: int | None) -> None:
        with self.lock:
            self.status[kind][status] += 1

    def failure(self, kind: str, exc: BaseException) -> None:
        with self.lock:
            self.exceptions[kind][type(exc).__name__] += 1

    def note(self, kind: str, value) -> None:
        with self.lock:
            self.notes[kind].append(value)

    def as_dict(self) -> dict:
        with self.lock:
            return {
                "status": {kind: dict(counts) for kind, counts in self.status.items()},
                "exceptions": {kind: dict(counts) for kind, counts in self.exceptions.items()},
                "notes": dict(self.notes),
            }

    def merge(self, other: dict) -> None:
        with self.lock:
            for kind, counts in other["status"].items():
                self.status[kind].update(counts)
            for kind, counts in other["exceptions"].items():
                self.exceptions[kind].update(counts)
            for kind, values in other["notes"].items():
                self.notes[kind].extend(values)


# Raw HTTP over a socket, for what requests cannot do (slow, partial and endless bodies).


def connect(port: int, timeout_s: float = 30.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(path: str, headers: dict) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict, bytes] | None:
    """Status, headers and body of one answer; None when the server closed without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    header_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = header_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def closed_by_peer(sock: socket.socket, wait_s: float) -> bool:
    """Whether the server closes the connection within `wait_s` seconds."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def stream_until_answered(sock: socket.socket, chunks, deadline_s: float):
    """Sends `chunks` until the server answers; (answer, bytes sent, seconds)."""
    started, sent = time.monotonic(), 0
    sock.setblocking(False)
    try:
        pending = b""
        while time.monotonic() - started < deadline_s:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break
            if writable:
                if not pending:
                    pending = next(chunks, b"")
                    if not pending:
                        break
                try:
                    count = sock.send(pending)
                except (BlockingIOError, InterruptedError):
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent, pending = sent + count, pending[count:]
    finally:
        sock.setblocking(True)
        sock.settimeout(30.0)
    return read_response(sock), sent, time.monotonic() - started


def huge_body(port: int, max_body_bytes: int):
    """A declared Content-Length 16x over the limit, then the body as fast as the server reads."""
    total = 16 * max_body_bytes
    chunk = b"x" * 65536
    with connect(port) as sock:
        sock.sendall(
            head("/retrieve", {"Content-Type": "application/json", "Content-Length": total})
        )
        answer, sent, seconds = stream_until_answered(sock, iter(lambda: chunk, None), 30.0)
    return answer, {"bytes_sent_before_answer": sent, "seconds": seconds}


def huge_chunked_body(port: int, max_body_bytes: int):
    """A chunked body that never ends: the server must stop it just past the limit."""
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    with connect(port) as sock:
        sock.sendall(
            head("/retrieve", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        )
        answer, sent, seconds = stream_until_answered(sock, iter(lambda: chunk, None), 30.0)
    return answer, {"bytes_sent_before_answer": sent, "seconds": seconds}


def disconnect_mid_body(port: int, rng: random.Random):
    """Declares 4000 bytes, sends a few hundred, hangs up (half the time with a reset)."""
    body = json.dumps({"queries": ["a" * 3980]}).encode()
    sock = connect(port)
    try:
        sock.sendall(
            head("/retrieve", {"Content-Type": "application/json", "Content-Length": len(body)})
            + body[: rng.randrange(1, 600)]
        )
        time.sleep(rng.uniform(0.0, 0.05))
        if rng.random() < 0.5:  # RST instead of FIN
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
    finally:
        sock.close()
    return None, {}


def slow_sender(port: int, stall: bool, step_s: float, give_up_s: float = 30.0):
    """Headers, then the body 3 bytes every `step_s` seconds; `stall`: 5 bytes, then one byte
    every 3 steps, never the last one. Gives up `give_up_s` seconds after the headers."""
    body = json.dumps({"queries": ["who founded the studio"], "topk": 2}).encode()
    with connect(port, timeout_s=give_up_s) as sock:
        sock.sendall(
            head("/retrieve", {"Content-Type": "application/json", "Content-Length": len(body)})
        )
        started = time.monotonic()
        if stall:
            pieces = [body[:5]] + [body[i : i + 1] for i in range(5, len(body) - 1)]
        else:
            pieces = [body[i : i + 3] for i in range(0, len(body), 3)]
        readable = []
        for piece in pieces:
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([sock], [], [], step_s * (3 if stall else 1))
            if readable or time.monotonic() - started > give_up_s:
                break
        if not readable:
            left = max(0.1, give_up_s - (time.monotonic() - started))
            readable, _, _ = select.select([sock], [], [], left)
        answer = None
        if readable:
            sock.settimeout(10.0)
            try:
                answer = read_response(sock)
            except (ConnectionResetError, BrokenPipeError):
                pass
        seconds = time.monotonic() - started
        closed = answer is not None and closed_by_peer(sock, 2.0)
    return answer, {"seconds": seconds, "closed_after": closed}


def hostile_bodies(max_queries: int, max_query_chars: int, max_body_bytes: int) -> dict:
    """(path, method, headers, body) per simple hostile kind; each kind may have several."""
    json_type = {"Content-Type": "application/json"}
    many = b'{"queries": [' + b",".join([b"1"] * ((max_body_bytes - 64) // 2)) + b"]}"
    depth = 100_000
    return {
        "malformed_json": [
            ("/retrieve", "POST", json_type, b'{"queries": ["a"'),
            ("/retrieve", "POST", json_type, b'{"queries": ["a"],}'),
            ("/retrieve", "POST", json_type, b"   "),
        ],
        "wrong_types": [
            ("/retrieve", "POST", json_type, b'{"queries": 5}'),
            ("/retrieve", "POST", json_type, b'{"queries": ["a"], "topk": "3"}'),
            ("/retrieve", "POST", json_type, b'{"queries": ["a"], "return_scores": "yes"}'),
            ("/retrieve", "POST", json_type, b'{"queries": ["a"], "topk": 2.5}'),
            ("/retrieve", "POST", json_type, b"[1, 2, 3]"),
            ("/retrieve", "POST", json_type, b"null"),
        ],
        "nested_garbage": [
            (
                "/retrieve",
                "POST",
                json_type,
                json.dumps(
                    {"queries": [[{"a": [1, {"b": None}]}], {"c": []}], "topk": {"x": [[]]}}
                ).encode(),
            ),
            ("/retrieve", "POST", json_type, b'{"queries": [[[[["a"]]]]]}'),
        ],
        "deep_nesting": [
            ("/retrieve", "POST", json_type, b'{"queries": ' + b"[" * depth + b"]" * depth + b"}")
        ],
        "invalid_utf8": [("/retrieve", "POST", json_type, b'{"queries": ["\xff\xfe\xc3"]}')],
        "lone_surrogates": [
            ("/retrieve", "POST", json_type, b'{"queries": ["\\ud800 abc", "x\\udfff"]}')
        ],
        "many_non_strings": [("/retrieve", "POST", json_type, many)],
        "empty_queries": [("/retrieve", "POST", json_type, b'{"queries": []}')],
        "too_many_queries": [
            (
                "/retrieve",
                "POST",
                json_type,
                json.dumps({"queries": ["a"] * (max_queries + 1)}).encode(),
            )
        ],
        "long_query": [
            (
                "/retrieve",
                "POST",
                json_type,
                json.dumps({"queries": ["x" * (max_query_chars + 1)]}).encode(),
            )
        ],
        "wrong_content_type": [
            ("/retrieve", "POST", {"Content-Type": "text/plain"}, b'{"queries": ["a"]}'),
            (
                "/retrieve",
                "POST",
                {"Content-Type": "application/x-www-form-urlencoded"},
                b"queries=a",
            ),
        ],
        "unknown_path": [
            ("/nope", "GET", {}, None),
            ("/retrieve/../../etc/passwd", "POST", json_type, b'{"queries": ["a"]}'),
            ("/" + "a" * 2000, "POST", json_type, b"{}"),
        ],
        "wrong_method": [("/retrieve", "GET", {}, None), ("/health", "DELETE", {}, None)],
    }


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"requests": 0}
    return {
        "requests": len(latencies),
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
        "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
        "max_ms": round(max(latencies) * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20 s of load (whole run < 1 min)")
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds of load (default 60; quick 20)"
    )
    parser.add_argument("--clients", type=int, default=4, help="valid and hostile client threads")
    parser.add_argument("--num-docs", type=int, default=None, help="default 2000 (quick: 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    duration = args.duration if args.duration is not None else (20.0 if args.quick else 60.0)
    num_docs = args.num_docs or (300 if args.quick else 2000)
    began = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.path.insert(0, REPO_ROOT)
    # Here, not at the top: the hostile clients' process (spawned) needs none of these.
    from dgpo_jax.data.synthetic import generate_world, write_world  # noqa: PLC0415
    from retrieval_service.index import build_index  # noqa: PLC0415

    workdir = tempfile.mkdtemp(prefix="server-load-")
    server = None
    try:
        world = generate_world(seed=args.seed, num_entities=num_docs)
        paths = write_world(world, workdir)
        questions = [row["question"] for row in world.train + world.test]
        index_dir = os.path.join(workdir, "bm25")
        build_index(paths["corpus.jsonl"], index_dir, "bm25", show_progress=False)
        log(f"index: {len(world.corpus)} documents ({time.perf_counter() - began:.1f} s)")
        server = Server(index_dir, os.path.join(workdir, "server.log"))
        health = server.wait_ready()
        log(f"server up on port {server.port} ({time.perf_counter() - began:.1f} s)")
        report = run_load(server, health, questions, duration, args.clients, args.seed)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report.update(
        {
            "benchmark": "server_load",
            "mode": "quick" if args.quick else "full",
            "duration_s": duration,
            "clients": args.clients,
            "num_documents": num_docs,
            "machine": cpu_machine(),
            "python": platform.python_version(),
            "versions": {
                name: importlib.metadata.version(name)
                for name in ("uvicorn", "fastapi", "starlette", "h11")
            },
            "total_seconds": round(time.perf_counter() - began, 1),
        }
    )
    print(json.dumps(report))
    return report


def hostile_client(port: int, limits: dict, seed: int, number: int, stop, tally: Tally) -> None:
    """Cycles through the hostile kinds until `stop` is set."""
    max_body_bytes = limits["max_body_bytes"]
    simple = hostile_bodies(limits["max_queries"], limits["max_query_chars"], max_body_bytes)
    kinds = list(simple) + ["huge_body", "huge_chunked_body", "disconnect_mid_body"]
    rng = random.Random(seed * 1000 + 500 + number)
    session = requests.Session()
    turn = number
    while not stop.is_set():
        kind = kinds[turn % len(kinds)]
        turn += 1
        try:
            if kind == "huge_body":
                answer, extra = huge_body(port, max_body_bytes)
            elif kind == "huge_chunked_body":
                answer, extra = huge_chunked_body(port, max_body_bytes)
            elif kind == "disconnect_mid_body":
                answer, extra = disconnect_mid_body(port, rng)
            else:
                path, method, headers, body = rng.choice(simple[kind])
                response = session.request(
                    method, f"http://{HOST}:{port}{path}", data=body, headers=headers, timeout=30
                )
                answer, extra = (response.status_code, dict(response.headers), b""), {}
                if response.status_code >= 500 or response.json().get("error") is None:
                    tally.note(kind, response.text[:200])
        except (OSError, requests.RequestException, ValueError) as exc:
            tally.failure(kind, exc)
            session = requests.Session()
            continue
        tally.answer(kind, None if answer is None else answer[0])
        if extra:
            tally.note(kind, extra)


def slow_client(port: int, number: int, stop, tally: Tally) -> None:
    """Slow senders, alternately one that finishes in ~5 s and one that stalls."""
    turn = number
    while not stop.is_set():
        stall = turn % 2 == 1
        kind = "slow_sender_stalled" if stall else "slow_sender"
        turn += 1
        try:
            answer, extra = slow_sender(port, stall, step_s=0.25)
        except OSError as exc:
            tally.failure(kind, exc)
            continue
        tally.answer(kind, None if answer is None else answer[0])
        tally.note(kind, extra)


def slow_headers(port: int, stop, tally: Tally) -> None:
    """Never finishes its headers: one more header byte each second, until `stop` is set."""
    started = time.monotonic()
    try:
        with connect(port) as sock:
            sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            while not stop.is_set():
                if closed_by_peer(sock, 1.0):
                    tally.note(
                        "slow_headers",
                        {"closed_by_server": True, "seconds": time.monotonic() - started},
                    )
                    return
                sock.sendall(b"a")
    except OSError as exc:
        tally.failure("slow_headers", exc)
        return
    tally.note("slow_headers", {"closed_by_server": False, "seconds": time.monotonic() - started})


def hostile_process(port: int, limits: dict, clients: int, seed: int, stop, results) -> None:
    """The hostile side, in its own process (so that its work does not slow the valid clients'
    Python threads): `clients` hostile clients, max(2, clients) slow senders and one slow
    header sender, until `stop` is set; then its tally goes into `results`."""
    tally = Tally()
    threads = [
        threading.Thread(target=hostile_client, args=(port, limits, seed, i, stop, tally))
        for i in range(clients)
    ]
    threads += [
        threading.Thread(target=slow_client, args=(port, i, stop, tally))
        for i in range(max(2, clients))
    ]
    threads.append(threading.Thread(target=slow_headers, args=(port, stop, tally)))
    for thread in threads:
        thread.start()
    for thread in threads:  # a stalled slow sender waits out the server's body timeout
        thread.join()
    results.put(tally.as_dict())


def run_load(
    server: Server, health: dict, questions: list[str], duration: float, clients: int, seed: int
) -> dict:
    limits = {
        name: health[name]
        for name in ("max_topk", "max_queries", "max_query_chars", "max_body_bytes")
    }
    max_body_bytes = limits["max_body_bytes"]
    tally, latencies = Tally(), {"baseline": [], "mixed": []}
    phase = {"name": "warmup"}
    stop_valid = threading.Event()
    context = multiprocessing.get_context("spawn")
    stop_hostile, hostile_results = context.Event(), context.Queue()
    sampler = MemorySampler(server.process.pid)
    sampler.start()

    def valid_client(number: int) -> None:
        rng = random.Random(seed * 1000 + number)
        session = requests.Session()
        while not stop_valid.is_set():
            body = {
                "queries": rng.sample(questions, rng.randint(1, 8)),
                "topk": rng.randint(1, 5),
                "return_scores": rng.random() < 0.5,
            }
            started, started_in = time.perf_counter(), phase["name"]
            try:
                response = session.post(server.url + "/retrieve", json=body, timeout=60)
            except requests.RequestException as exc:
                tally.failure("valid", exc)
                session = requests.Session()
                continue
            elapsed = time.perf_counter() - started
            tally.answer("valid", response.status_code)
            if response.status_code == 200 and len(response.json()["result"]) == len(
                body["queries"]
            ):
                if started_in in latencies:  # the phase it was sent in
                    latencies[started_in].append(elapsed)
            else:
                tally.note("valid", response.text[:200])

    baseline_s = duration / 3
    valid_threads = [
        threading.Thread(target=valid_client, args=(i,), daemon=True) for i in range(clients)
    ]
    for thread in valid_threads:
        thread.start()
    time.sleep(min(2.0, baseline_s / 3))  # warm-up: connections, caches
    sampler.mark("before")
    phase["name"] = "baseline"
    log(f"baseline: {clients} valid clients for {baseline_s:.0f} s")
    time.sleep(baseline_s)
    mixed_s = duration - baseline_s
    log(f"mixed: + {clients} hostile clients, {max(2, clients)} slow senders for {mixed_s:.0f} s")
    hostile = context.Process(
        target=hostile_process,
        args=(server.port, limits, clients, seed, stop_hostile, hostile_results),
    )
    hostile.start()
    hostile_reported = False
    try:
        phase["name"] = "mixed"
        time.sleep(mixed_s / 2)
        sampler.mark("mixed_half")
        time.sleep(mixed_s / 2)
        phase["name"] = "draining"
        stop_hostile.set()
        # Each hostile request gives up within 30 s (a slow sender 30 s after its headers).
        tally.merge(hostile_results.get(timeout=90))
        hostile_reported = True
    except queue.Empty:
        log("the hostile clients did not finish within 90 s of the end: their counts are lost")
    finally:
        stop_hostile.set()
        stop_valid.set()
        hostile.join(timeout=5)
        if hostile.is_alive():
            hostile.terminate()
            hostile.join()
    for thread in valid_threads:
        thread.join()
    sampler.mark("end_of_load")
    time.sleep(2.0)  # let the server free what the last requests held
    sampler.mark("after")
    sampler.stop()

    alive = server.process.poll() is None
    try:
        final = requests.post(
            server.url + "/retrieve", json={"queries": questions[:2], "topk": 2}, timeout=30
        )
        still_serving = final.status_code == 200 and len(final.json()["result"]) == 2
    except requests.RequestException:
        still_serving = False
    server_log = server.log()

    status_by_kind = {
        kind: {str(status): count for status, count in sorted(counts.items(), key=str)}
        for kind, counts in sorted(tally.status.items())
    }
    server_5xx = {
        kind: sum(count for status, count in counts.items() if status and status >= 500)
        for kind, counts in tally.status.items()
    }
    unexpected = {
        kind: {
            str(status): count for status, count in counts.items() if status not in EXPECTED[kind]
        }
        for kind, counts in tally.status.items()
        if kind in EXPECTED and set(counts) - EXPECTED[kind]
    }
    if "valid" in tally.status and set(tally.status["valid"]) - {200}:
        unexpected["valid"] = {
            str(status): count for status, count in tally.status["valid"].items() if status != 200
        }

    def seconds_of(kind: str, field: str = "seconds") -> dict:
        values = [note[field] for note in tally.notes[kind] if isinstance(note, dict)]
        if not values:
            return {}
        return {"min_s": round(min(values), 2), "max_s": round(max(values), 2)}

    def max_of(kind: str, field: str):
        values = [note[field] for note in tally.notes[kind] if isinstance(note, dict)]
        return round(max(values), 3) if values else None

    marks = sampler.marks
    before, after = marks["before"], marks["after"]
    report = {
        "server_limits": limits,
        "requests_by_kind": {
            kind: sum(counts.values()) for kind, counts in sorted(tally.status.items())
        },
        "status_by_kind": status_by_kind,
        "client_exceptions_by_kind": {
            kind: dict(counts) for kind, counts in sorted(tally.exceptions.items())
        },
        "server_5xx": sum(server_5xx.values()),
        "hostile_side_reported": hostile_reported,
        "unexpected_statuses": unexpected,
        "server_alive_at_end": alive,
        "valid_request_ok_at_end": still_serving,
        "server_log_tracebacks": server_log.count("Traceback"),
        "rss_mb": {
            "before": round(before, 1),
            "mixed_half": round(marks["mixed_half"], 1),
            "end_of_load": round(marks["end_of_load"], 1),
            "after": round(after, 1),
            "peak": round(sampler.peak, 1),
            "growth": round(after - before, 1),
            "peak_growth": round(sampler.peak - before, 1),
        },
        "valid_latency": {name: percentiles(values) for name, values in latencies.items()},
        "huge_body": {
            "declared_bytes": 16 * max_body_bytes,
            "max_bytes_sent_before_413": max_of("huge_body", "bytes_sent_before_answer"),
            "max_seconds_to_413": max_of("huge_body", "seconds"),
        },
        "huge_chunked_body": {
            "max_bytes_sent_before_413": max_of("huge_chunked_body", "bytes_sent_before_answer"),
            "max_seconds_to_413": max_of("huge_chunked_body", "seconds"),
        },
        "slow_sender": seconds_of("slow_sender"),
        "slow_sender_stalled": {
            **seconds_of("slow_sender_stalled"),
            "connection_closed_after_408": all(
                note["closed_after"] for note in tally.notes["slow_sender_stalled"]
            ),
        },
        "slow_headers": tally.notes["slow_headers"][-1] if tally.notes["slow_headers"] else None,
        "valid_failures": tally.notes["valid"][:5],
    }
    if report["slow_headers"]:
        report["slow_headers"]["seconds"] = round(report["slow_headers"]["seconds"], 1)
    log(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
