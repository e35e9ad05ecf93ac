"""The retrieval server, run for real (uvicorn in a subprocess on a free loopback port)."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import requests

from dgpo_jax.data.synthetic import generate_world, write_world
from dgpo_jax.retrieval import HttpRetriever, InProcessRetriever, RetrievalUnavailableError
from retrieval_service.index import build_index, load_index
from retrieval_service.serve import create_app

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = {
    "max_topk": 10,
    "max_queries": 64,
    "max_query_chars": 1000,
    "max_body_bytes": 65536,
    "torch_threads": 1,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m retrieval_service.serve`` in a subprocess; `wait_ready` polls /health."""

    def __init__(self, index_dir, log_path, extra_args=(), env=None, port=None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        args = [
            sys.executable,
            "-m",
            "retrieval_service.serve",
            "--index",
            str(index_dir),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *extra_args,
        ]
        environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
        }
        environment.update(env or {})
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                args, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=environment
            )

    def wait_ready(self, timeout_s: float = 180.0) -> ServerProcess:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not come up in {timeout_s:.0f} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-4000:]

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    world = generate_world(seed=3, num_entities=300)
    out = tmp_path_factory.mktemp("world")
    write_world(world, out)
    return world, out


@pytest.fixture(scope="module")
def deployment(world_dir, tmp_path_factory):
    """BM25 and dense indexes of the world, each served by its own server process."""
    world, out = world_dir
    logs = tmp_path_factory.mktemp("logs")
    limit_args = [f"--{name.replace('_', '-')}={value}" for name, value in LIMITS.items()]
    indexes, servers = {}, {}
    try:
        for kind in ("bm25", "dense"):  # the BM25 server starts while the dense index builds
            indexes[kind] = out / kind
            build_index(
                out / "corpus.jsonl", indexes[kind], kind, show_progress=False, torch_threads=1
            )
            servers[kind] = ServerProcess(indexes[kind], logs / f"{kind}.log", limit_args)
        for server in servers.values():
            server.wait_ready()
        yield indexes, servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def indexes(deployment):
    return deployment[0]


@pytest.fixture(scope="module")
def servers(deployment):
    return deployment[1]


def _queries(world, count=40):
    questions = [row["question"] for row in world.test[:count]]
    return questions + ["", "zzz qqq unknown words", world.corpus[5]["contents"]]


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_server_returns_what_the_in_process_retriever_returns(kind, servers, indexes, world_dir):
    world, _ = world_dir
    queries = _queries(world)
    local = InProcessRetriever(indexes[kind], torch_threads=1)
    remote = HttpRetriever(servers[kind].url)
    expected = local.retrieve(queries, topk=5)
    # Ids, contents and scores. (Dense scores depend on how queries are batched, by ~1e-7, so
    # both sides get the same batches.)
    assert remote.retrieve(queries, topk=5) == expected
    assert remote.search(queries) == local.search(queries)
    assert all(len(documents) == 5 for documents in expected)
    bare = requests.post(
        servers[kind].url + "/retrieve", json={"queries": queries[:3], "topk": 2}, timeout=30
    )
    assert bare.json() == {
        "result": [
            [{"id": doc.id, "contents": doc.contents} for doc in documents[:2]]
            for documents in expected[:3]
        ]
    }
    # A dead URL in the list is skipped over.
    assert HttpRetriever(
        [f"http://127.0.0.1:{free_port()}", servers[kind].url], backoff_s=0.01
    ).retrieve(queries[:4], topk=5) == local.retrieve(queries[:4], topk=5)


def test_single_hop_questions_find_their_document_through_the_server(servers, world_dir):
    world, _ = world_dir
    rows = [row for row in world.test if row["data_source"] == "synthetic_1hop"]
    results = HttpRetriever(servers["bm25"].url).retrieve([row["question"] for row in rows], topk=3)
    hits = [
        row["extra_info"]["gold_doc_ids"][0] in {doc.id for doc in documents}
        for row, documents in zip(rows, results)
    ]
    assert sum(hits) / len(hits) >= 0.9


def test_health_and_openapi(servers, world_dir):
    world, _ = world_dir
    health = requests.get(servers["dense"].url + "/health", timeout=10).json()
    assert health["status"] == "ok"
    assert (health["index"]["kind"], health["index"]["num_documents"]) == (
        "dense",
        len(world.corpus),
    )
    assert health["index"]["dimension"] == 384 and health["max_topk"] == LIMITS["max_topk"]
    schema = requests.get(servers["bm25"].url + "/openapi.json", timeout=10).json()
    assert {"/retrieve", "/health"} <= set(schema["paths"])
    assert "RetrieveRequest" in json.dumps(schema["paths"]["/retrieve"])


JSON = {"Content-Type": "application/json"}


def _chunked(data: bytes, size: int = 8192):
    for start in range(0, len(data), size):
        yield data[start : start + size]


BAD_REQUESTS = [
    (
        "topk zero",
        {"json": {"queries": ["a"], "topk": 0}},
        422,
        "topk must be between 1 and 10, got 0",
    ),
    (
        "topk negative",
        {"json": {"queries": ["a"], "topk": -3}},
        422,
        "topk must be between 1 and 10",
    ),
    (
        "topk over limit",
        {"json": {"queries": ["a"], "topk": 11}},
        422,
        "topk must be between 1 and 10, got 11",
    ),
    (
        "topk not int",
        {"json": {"queries": ["a"], "topk": "3"}},
        422,
        "topk: Input should be a valid integer",
    ),
    ("empty queries", {"json": {"queries": []}}, 422, "queries must be a non-empty list"),
    (
        "too many queries",
        {"json": {"queries": ["a"] * 65}},
        422,
        "queries holds 65 queries, the limit is 64",
    ),
    (
        "non-string query",
        {"json": {"queries": ["a", 5]}},
        422,
        "queries.1: Input should be a valid string",
    ),
    (
        "queries not a list",
        {"json": {"queries": "a"}},
        422,
        "queries: Input should be a valid list",
    ),
    ("no queries", {"json": {"topk": 3}}, 422, "queries: Field required"),
    (
        "query too long",
        {"json": {"queries": ["x" * 1001]}},
        422,
        "queries[0] has 1001 characters, the limit is 1000",
    ),
    ("body not an object", {"json": [1, 2]}, 422, "Input should be a valid dictionary"),
    (
        "malformed JSON",
        {"data": b'{"queries": ["a"', "headers": {"Content-Type": "application/json"}},
        400,
        "malformed JSON body",
    ),
    (
        "empty body",
        {"data": b"", "headers": {"Content-Type": "application/json"}},
        422,
        "request body is empty",
    ),
    ("not JSON content type", {"data": b"queries=a"}, 422, "Content-Type: application/json"),
    ("huge body", {"json": {"queries": ["y" * 100_000]}}, 413, "exceeds the limit of 65536 bytes"),
    (
        "huge chunked body",
        {
            "data": _chunked(json.dumps({"queries": ["z" * 200_000]}).encode()),
            "headers": {"Content-Type": "application/json"},
        },
        413,
        "exceeds the limit of 65536 bytes",
    ),
    # Hostile bodies (see benchmarks/server_load.py).
    ("queries a number", {"json": {"queries": 5}}, 422, "queries: Input should be a valid list"),
    (
        "return_scores not a bool",
        {"json": {"queries": ["a"], "return_scores": "yes"}},
        422,
        "return_scores: Input should be a valid boolean",
    ),
    (
        "nested garbage",
        {"json": {"queries": [[{"a": [1, {"b": None}]}], {"c": []}], "topk": {"x": [[]]}}},
        422,
        "queries.0: Input should be a valid string; topk: Input should be a valid integer",
    ),
    ("null body", {"data": b"null", "headers": JSON}, 422, "valid dictionary"),
    (
        "a million non-strings",  # counted before validation: one error, not one per item
        {"data": b'{"queries": [' + b",".join([b"1"] * 30_000) + b"]}", "headers": JSON},
        422,
        "queries holds 30000 queries, the limit is 64",
    ),
    (
        "deep nesting",
        {"data": b"[" * 30_000 + b"]" * 30_000, "headers": JSON},
        400,
        "malformed JSON body (nested too deeply",
    ),
    (
        "invalid UTF-8",
        {"data": b'{"queries": ["\xff\xfe"]}', "headers": JSON},
        400,
        "malformed JSON body (not UTF-8",
    ),
    (
        "integer of 5000 digits",
        {"data": b'{"queries": ["a"], "topk": ' + b"9" * 5000 + b"}", "headers": JSON},
        400,
        "Exceeds the limit (4300 digits) for integer string conversion",
    ),
]


@pytest.mark.parametrize(
    "name, request_kwargs, status, message", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS]
)
def test_bad_requests_get_a_4xx_and_the_server_stays_up(
    servers, name, request_kwargs, status, message
):
    server = servers["bm25"]
    response = requests.post(server.url + "/retrieve", timeout=30, **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert server.process.poll() is None
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    ok = requests.post(server.url + "/retrieve", json={"queries": ["a"], "topk": 1}, timeout=30)
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == 1


def test_bearer_token(indexes):
    from fastapi.testclient import TestClient  # noqa: PLC0415 (retrieval extra)

    client = TestClient(create_app(load_index(indexes["bm25"]), token="s3cret"))
    body = {"queries": ["a"], "topk": 1}
    assert client.post("/retrieve", json=body).status_code == 401
    wrong = client.post("/retrieve", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["error"]
    assert (
        client.post("/retrieve", json=body, headers={"Authorization": "Bearer s3cret"}).status_code
        == 200
    )
    assert client.get("/health").json()["auth_required"] is True


def test_client_retries_then_gives_up_when_the_server_is_killed_mid_run(
    indexes, tmp_path, world_dir
):
    world, _ = world_dir
    server = ServerProcess(indexes["bm25"], tmp_path / "killed.log").wait_ready()
    retriever = HttpRetriever(
        server.url, deadline=2.0, max_retries=10_000, backoff_s=0.05, max_backoff_s=0.4
    )
    queries = [row["question"] for row in world.train[:8]]
    killer = threading.Timer(0.5, lambda: os.kill(server.process.pid, signal.SIGKILL))
    answered = 0
    try:
        killer.start()
        with pytest.raises(RetrievalUnavailableError, match="the deadline of 2 s passed") as info:
            for _ in range(100_000):
                call_started = time.monotonic()
                assert len(retriever.retrieve(queries)) == len(queries)
                answered += 1
    finally:
        killer.cancel()
        server.stop()
    failed_after = time.monotonic() - call_started
    assert answered > 0  # it was serving before the kill
    assert server.process.returncode == -signal.SIGKILL
    assert info.value.attempts > 3  # it retried
    assert "connection failed" in info.value.errors[-1]
    assert 1.5 <= failed_after < 6.0


# Hostile clients on raw sockets: what requests cannot send.


def _raw_answer(sock: socket.socket) -> tuple[int, dict, bytes] | None:
    """Status, headers and body of one HTTP answer; None when the server closed without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines[1:])
    }
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _post_head(port: int, headers: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    lines = ["POST /retrieve HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _assert_still_serving(url: str, process=None, log: str | None = None):
    if process is not None:
        assert process.poll() is None
    ok = requests.post(url + "/retrieve", json={"queries": ["a"], "topk": 1}, timeout=10)
    assert ok.status_code == 200 and len(ok.json()["result"][0]) == 1
    assert log is None or "Traceback" not in log


def test_unknown_paths_and_methods_get_a_json_4xx(servers):
    server = servers["bm25"]
    for method, path, status, message in [
        ("get", "/nope", 404, "no such path '/nope'"),
        ("post", "/retrieve/extra", 404, "no such path"),
        ("get", "/retrieve", 405, "method GET is not allowed on /retrieve"),
        ("post", "/health", 405, "method POST is not allowed on /health"),
    ]:
        response = getattr(requests, method)(server.url + path, timeout=10)
        assert response.status_code == status and message in response.json()["error"]
    assert requests.get(server.url + "/retrieve", timeout=10).headers["allow"] == "POST"
    _assert_still_serving(server.url, server.process)


def test_a_declared_content_length_over_the_limit_is_answered_before_the_body(servers):
    server = servers["bm25"]
    with _post_head(server.port, {"Content-Length": 100 * LIMITS["max_body_bytes"]}) as sock:
        status, _, body = _raw_answer(sock)  # no body sent: the answer must not wait for it
    assert status == 413 and "exceeds the limit of 65536 bytes" in json.loads(body)["error"]
    _assert_still_serving(server.url, server.process, server.log())


def test_a_client_hanging_up_mid_body_leaves_the_server_serving(servers):
    server = servers["bm25"]
    body = json.dumps({"queries": ["a" * 900]}).encode()
    for linger in (False, True):  # FIN, then RST
        sock = _post_head(server.port, {"Content-Length": len(body)})
        sock.sendall(body[:100])
        if linger:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    chunked = _post_head(server.port, {"Transfer-Encoding": "chunked"})
    chunked.sendall(b"10\r\n" + b"x" * 16 + b"\r\n")
    chunked.close()
    time.sleep(0.2)
    _assert_still_serving(server.url, server.process, server.log())


@pytest.fixture(scope="module")
def impatient_server(indexes):
    """The app in an in-process uvicorn whose body deadline is short (0.8 s)."""
    import uvicorn  # noqa: PLC0415 (retrieval extra)

    app = create_app(load_index(indexes["bm25"]), max_body_bytes=65536, body_timeout_s=0.8)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(timeout=10)


def test_a_slow_sender_gets_408_and_does_not_hold_up_other_clients(impatient_server):
    url, port = impatient_server
    body = json.dumps({"queries": ["who founded the studio"], "topk": 2}).encode()
    stalled = [_post_head(port, {"Content-Length": len(body)}) for _ in range(8)]
    slow_chunked = _post_head(port, {"Transfer-Encoding": "chunked"})
    started = time.monotonic()
    try:
        for sock in stalled:
            sock.sendall(body[:5])
        slow_chunked.sendall(b"3\r\nabc\r\n")
        # Eight stalled bodies: everyone else is still answered at once.
        for _ in range(5):
            call = time.monotonic()
            _assert_still_serving(url)
            assert time.monotonic() - call < 0.5
        # A slow sender that finishes within the deadline is served.
        with _post_head(port, {"Content-Length": len(body)}) as sock:
            for start in range(0, len(body), 8):
                sock.sendall(body[start : start + 8])
                time.sleep(0.05)
            status, _, answer = _raw_answer(sock)
        assert status == 200 and len(json.loads(answer)["result"][0]) == 2
        # The stalled ones get 408 at the deadline, and their connections are closed.
        for sock in [*stalled, slow_chunked]:
            status, headers, answer = _raw_answer(sock)
            assert status == 408 and "did not arrive within 0.8 s" in json.loads(answer)["error"]
            assert headers["connection"] == "close" and sock.recv(1) == b""
        assert 0.7 < time.monotonic() - started < 5
    finally:
        for sock in [*stalled, slow_chunked]:
            sock.close()
    _assert_still_serving(url)


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_lone_surrogates_in_queries_are_searched_as_replacement_characters(kind, servers):
    # Valid JSON, but no text encoder takes them (the dense server used to answer 500).
    url = servers[kind].url
    escaped = requests.post(
        url + "/retrieve",
        data=b'{"queries": ["\\ud800 abc", "x\\udfff"]}',
        headers=JSON,
        timeout=30,
    )
    assert escaped.status_code == 200, escaped.text
    replaced = requests.post(
        url + "/retrieve", json={"queries": ["\ufffd abc", "x\ufffd"]}, timeout=30
    )
    assert escaped.json() == replaced.json() and len(escaped.json()["result"]) == 2
    _assert_still_serving(url, servers[kind].process, servers[kind].log())
