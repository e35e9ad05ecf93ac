"""Protocol text, documents and the HTTP client (against small stand-in servers)."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

from dgpo_jax.retrieval import (
    INVALID_ACTION_NOTICE,
    SEARCH_R1_PROMPT_TEMPLATE,
    Document,
    HttpRetriever,
    RetrievalRequestError,
    RetrievalResponseError,
    RetrievalUnavailableError,
    Retriever,
    documents_from_response,
    format_documents,
    format_prompt,
    information_observation,
    parse_action,
)

WIKI_CONTENTS = '"Hamlet"\nHamlet is a tragedy by William Shakespeare.\nIt is set in Denmark.'


def test_document_title_and_text_follow_the_wiki_layout():
    document = Document(id="42", contents=WIKI_CONTENTS, score=0.5)
    assert document.title_line == '"Hamlet"'
    assert document.title == "Hamlet"
    assert document.text == "Hamlet is a tragedy by William Shakespeare.\nIt is set in Denmark."
    bare = Document(id="1", contents="Only a title")
    assert (bare.title, bare.text) == ("Only a title", "")
    assert Document(id="2", contents='"a "quoted" word"\nx').title == 'a "quoted" word'


def test_format_documents_matches_the_reference_text():
    documents = [
        Document("42", WIKI_CONTENTS, 0.9),
        Document("7", "Kalo Venter\nKalo Venter is a poet."),
    ]
    # Written out by hand from the reference _passages2string: title = first line verbatim.
    expected = (
        'Doc 1(Title: "Hamlet") Hamlet is a tragedy by William Shakespeare.\nIt is set in Denmark.\n'
        "Doc 2(Title: Kalo Venter) Kalo Venter is a poet.\n"
    )
    assert format_documents(documents) == expected
    assert format_documents(documents, strip_title_quotes=True).startswith(
        "Doc 1(Title: Hamlet) Hamlet"
    )
    assert format_documents([]) == ""


def test_observation_notice_and_prompt_are_the_reference_strings():
    assert (
        information_observation("Doc 1(Title: A) b\n")
        == "\n\n<information>Doc 1(Title: A) b</information>\n\n"
    )
    assert INVALID_ACTION_NOTICE == (
        "\nMy previous action is invalid. If I want to search, I should put the query between <search> "
        "and </search>. If I want to give the final answer, I should put the answer between <answer> "
        "and </answer>. Let me try again.\n"
    )
    prompt = format_prompt("  who wrote hamlet ")
    assert prompt.endswith("For example, <answer> Beijing </answer>. Question: who wrote hamlet?\n")
    assert prompt.startswith(
        "Answer the given question. You must conduct reasoning inside <think> and "
        "</think> first every time you get new information."
    )
    assert "You can search as many times as your want." in prompt
    assert format_prompt("who?") == SEARCH_R1_PROMPT_TEMPLATE.replace("{question}", "who?")
    with pytest.raises(ValueError, match="placeholder"):
        format_prompt("q", template="no placeholder")


@pytest.mark.parametrize(
    "turn, expected",
    [
        ("<think>x</think><search> kalo venter </search>", ("search", "kalo venter")),
        ("<answer>Port Avel</answer><search>later</search>", ("answer", "Port Avel")),
        ("<search>a\nb</search>", ("search", "a\nb")),
        ("<search>unclosed <answer>", (None, "")),
        ("<search>mismatched</answer>", (None, "")),
    ],
)
def test_parse_action_takes_the_first_well_formed_action(turn, expected):
    assert parse_action(turn) == expected


def test_documents_from_response_reads_both_reference_shapes():
    scored = {
        "result": [[{"document": {"id": "3", "contents": "T\nx", "title": "T"}, "score": 1.5}], []]
    }
    bare = {"result": [[{"id": 3, "contents": "T\nx"}], []]}
    assert documents_from_response(scored, 2) == [[Document("3", "T\nx", 1.5)], []]
    assert documents_from_response(bare, 2) == [[Document("3", "T\nx", None)], []]
    title_text = {"result": [[{"id": "9", "title": "Hamlet", "text": "A play."}]]}
    assert documents_from_response(title_text, 1)[0][0].contents == '"Hamlet"\nA play.'


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"results": []}, "'result' field"),
        ({"result": [[]]}, "1 result lists for 2 queries"),
        (
            {"result": [[], [{"document": {"id": "1"}}]]},
            r"result\[1\]\[0\]: the document has no string 'contents'",
        ),
        (
            {"result": [[], [{"document": {"id": "1", "contents": "x"}, "score": "high"}]]},
            r"result\[1\]\[0\].score",
        ),
        ({"result": [[], "nope"]}, r"result\[1\]: expected a list"),
    ],
)
def test_documents_from_response_names_the_bad_entry(payload, message):
    with pytest.raises(RetrievalResponseError, match=message):
        documents_from_response(payload, 2)


# ------------------------------------------------------------------------------------------------
# Stand-in servers speaking the reference API (the Search-R1 retrieval_server's answer shapes).
# ------------------------------------------------------------------------------------------------


class _StandIn:
    """A threaded HTTP server; `behaviour(body) -> (status, payload)` decides each answer."""

    def __init__(self, behaviour):
        self.requests: list[dict] = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append(
                    {
                        "path": self.path,
                        "body": body,
                        "authorization": self.headers.get("Authorization"),
                    }
                )
                status, payload = behaviour(body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=lambda: self.server.serve_forever(poll_interval=0.05), daemon=True
        )
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _reference_behaviour(body):
    """What the reference server answers: corpus rows, scored or bare."""
    topk = body.get("topk") or 3
    result = []
    for query in body["queries"]:
        documents = [
            {"id": str(rank), "contents": f"{query} {rank}\ntext of {query}"}
            for rank in range(topk)
        ]
        if body.get("return_scores"):
            result.append(
                [{"document": doc, "score": 1.0 / (rank + 1)} for rank, doc in enumerate(documents)]
            )
        else:
            result.append(documents)
    return 200, {"result": result}


@pytest.fixture
def stand_in():
    servers = []

    def start(behaviour=_reference_behaviour):
        server = _StandIn(behaviour)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_http_retriever_speaks_the_reference_api(stand_in):
    server = stand_in()
    retriever = HttpRetriever(server.url + "/retrieve", token="s3cret")
    assert isinstance(retriever, Retriever)
    documents = retriever.retrieve(["q1", "q2"], topk=2)
    assert server.requests[0]["path"] == "/retrieve"
    assert server.requests[0]["body"] == {"queries": ["q1", "q2"], "topk": 2, "return_scores": True}
    assert server.requests[0]["authorization"] == "Bearer s3cret"
    assert documents[1] == [
        Document("0", "q2 0\ntext of q2", 1.0),
        Document("1", "q2 1\ntext of q2", 0.5),
    ]
    assert retriever.search(["q1"]) == [
        "Doc 1(Title: q1 0) text of q1\nDoc 2(Title: q1 1) text of q1\n"
        "Doc 3(Title: q1 2) text of q1\n"
    ]
    assert retriever.retrieve([]) == []


def test_http_retriever_reads_bare_documents(stand_in):
    # A server that ignores return_scores and always answers bare corpus rows.
    server = stand_in(lambda body: _reference_behaviour({**body, "return_scores": False}))
    documents = HttpRetriever(server.url).retrieve(["q"], topk=1)
    assert documents == [[Document("0", "q 0\ntext of q", None)]]
    assert HttpRetriever(server.url).search(["q"], topk=1) == ["Doc 1(Title: q 0) text of q\n"]


def test_http_retriever_chunks_large_batches(stand_in):
    server = stand_in()
    retriever = HttpRetriever(server.url, max_batch_size=4)
    documents = retriever.retrieve([f"q{i}" for i in range(10)], topk=1)
    assert [len(request["body"]["queries"]) for request in server.requests] == [4, 4, 2]
    assert [docs[0].contents.split("\n")[0] for docs in documents] == [f"q{i} 0" for i in range(10)]


def test_http_retriever_round_robins_and_fails_over(stand_in):
    first, second = stand_in(), stand_in()
    retriever = HttpRetriever([first.url, second.url])
    for _ in range(4):
        retriever.retrieve(["q"])
    assert (len(first.requests), len(second.requests)) == (2, 2)
    with_dead = HttpRetriever([_dead_url(), first.url], max_retries=2, backoff_s=0.01)
    for _ in range(3):
        assert len(with_dead.retrieve(["q"])[0]) == 3
    assert len(first.requests) == 2 + 3


def test_http_retriever_retries_server_errors_then_succeeds(stand_in):
    answers = iter([(503, {"detail": "warming up"}), (500, {"error": "boom"})])
    server = stand_in(lambda body: next(answers, None) or _reference_behaviour(body))
    retriever = HttpRetriever(server.url, max_retries=3, backoff_s=0.01)
    assert len(retriever.retrieve(["q"])[0]) == 3
    assert len(server.requests) == 3


def test_http_retriever_does_not_retry_a_rejected_request(stand_in):
    server = stand_in(lambda body: (422, {"error": "topk must be between 1 and 100, got 500"}))
    retriever = HttpRetriever(server.url, max_retries=5)
    with pytest.raises(
        RetrievalRequestError, match="HTTP 422: topk must be between 1 and 100"
    ) as info:
        retriever.retrieve(["q"], topk=500)
    assert info.value.status_code == 422
    assert len(server.requests) == 1


def test_http_retriever_gives_up_after_max_retries(stand_in):
    server = stand_in(lambda body: (503, {"error": "overloaded"}))
    retriever = HttpRetriever(server.url, max_retries=2, backoff_s=0.01, deadline=30)
    with pytest.raises(
        RetrievalUnavailableError, match="3 attempts failed.*HTTP 503: overloaded"
    ) as info:
        retriever.retrieve(["q"])
    assert info.value.attempts == 3 and len(server.requests) == 3


def test_http_retriever_stops_at_its_deadline():
    retriever = HttpRetriever(
        _dead_url(), max_retries=10_000, deadline=0.8, backoff_s=0.05, max_backoff_s=0.2
    )
    started = time.monotonic()
    with pytest.raises(RetrievalUnavailableError, match="deadline of 0.8 s passed") as info:
        retriever.retrieve(["q"])
    elapsed = time.monotonic() - started
    assert 0.7 <= elapsed < 3.0
    assert info.value.attempts > 2
    assert "connection failed" in info.value.errors[-1]


def test_http_retriever_rejects_bad_arguments():
    with pytest.raises(ValueError, match="http://"):
        HttpRetriever("localhost:8000")
    retriever = HttpRetriever("http://127.0.0.1:9")
    with pytest.raises(TypeError, match="wrap a single query in a list"):
        retriever.retrieve("one query")
    with pytest.raises(TypeError, match=r"queries\[1\] must be a str"):
        retriever.retrieve(["a", 3])
    with pytest.raises(ValueError, match="topk must be positive"):
        retriever.retrieve(["a"], topk=0)
