"""Index building and in-process search, checked against hand-computed BM25 and a direct encoder."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest

from dgpo_jax.retrieval import Document, InProcessRetriever
from retrieval_service import CorpusError, IndexFormatError, IndexManifest
from retrieval_service import build_index as build_index_cli
from retrieval_service.encoders import TextEncoder, resolve_encoder_path, uses_e5_conventions
from retrieval_service.index import build_index, load_index

CORPUS = [
    {"id": "d0", "contents": "Apple Pie\nThe apple pie is sweet. Apple pie with cream."},
    {"id": "d1", "contents": "Banana Bread\nBanana bread is sweet bread."},
    {"id": "d2", "contents": "Cherry\nA cherry tree in the garden."},
    {"id": "d3", "contents": "Apple Tree\nAn apple tree grows apples."},
    {"id": 4, "contents": "Garden\nThe garden has a pond and a cherry tree.", "url": "ignored"},
]
# The analysed terms of each document, by hand: lowercase words minus the stop words
# the, is, with, a, in, an, and.
TERMS = [
    ["apple", "pie", "apple", "pie", "sweet", "apple", "pie", "cream"],
    ["banana", "bread", "banana", "bread", "sweet", "bread"],
    ["cherry", "cherry", "tree", "garden"],
    ["apple", "tree", "apple", "tree", "grows", "apples"],
    ["garden", "garden", "has", "pond", "cherry", "tree"],
]


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def lucene_bm25(query_terms, k1=1.5, b=0.75) -> np.ndarray:
    """Lucene BM25 of each document of TERMS for distinct query terms, written out directly."""
    num_docs = len(TERMS)
    average_length = sum(len(terms) for terms in TERMS) / num_docs
    scores = np.zeros(num_docs)
    for term in query_terms:
        df = sum(term in terms for terms in TERMS)
        idf = math.log(1 + (num_docs - df + 0.5) / (df + 0.5))
        for doc, terms in enumerate(TERMS):
            tf = terms.count(term)
            scores[doc] += idf * tf / (tf + k1 * (1 - b + b * len(terms) / average_length))
    return scores


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", CORPUS)


@pytest.fixture(scope="module")
def bm25_dir(corpus_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexes") / "bm25"
    build_index(corpus_path, out, "bm25", show_progress=False)
    return out


def test_manifest_records_the_corpus(bm25_dir, corpus_path):
    manifest = IndexManifest.read(bm25_dir)
    with open(corpus_path, "rb") as handle:
        assert manifest.corpus_sha256 == hashlib.sha256(handle.read()).hexdigest()
    assert (manifest.kind, manifest.num_documents, manifest.dimension, manifest.encoder) == (
        "bm25",
        5,
        None,
        None,
    )
    assert manifest.params["ignored_corpus_fields"] == ["url"]
    assert sorted(os.listdir(bm25_dir)) == ["bm25", "documents.arrow", "manifest.json"]


def test_bm25_scores_match_the_lucene_formula(bm25_dir):
    retriever = InProcessRetriever(bm25_dir)
    from retrieval_service.bm25 import analyze, english_stopwords  # noqa: PLC0415 (back end and its optional dependency loaded on use)

    assert [analyze(row["contents"], english_stopwords()) for row in CORPUS] == TERMS
    for query, terms in [
        ("Apple pie?", ["apple", "pie"]),
        ("sweet bread", ["sweet", "bread"]),
        ("the cherry tree in a garden", ["cherry", "tree", "garden"]),
    ]:
        expected = lucene_bm25(terms)
        documents = retriever.retrieve([query], topk=len(CORPUS))[0]
        scores = {doc.id: doc.score for doc in documents}
        np.testing.assert_allclose([scores[str(row["id"])] for row in CORPUS], expected, rtol=1e-5)
        assert [doc.score for doc in documents] == sorted(scores.values(), reverse=True)
        best = int(np.argmax(expected))
        assert (documents[0].id, documents[0].contents) == (
            str(CORPUS[best]["id"]),
            CORPUS[best]["contents"],
        )


def test_in_process_topk_handling(bm25_dir):
    retriever = InProcessRetriever(bm25_dir, topk=2)
    assert [len(docs) for docs in retriever.retrieve(["apple", "zzz unknown", ""])] == [2, 2, 2]
    assert len(retriever.retrieve(["apple"], topk=50)[0]) == 5  # clamped to the corpus size
    assert retriever.retrieve([]) == []
    assert retriever.search(["banana bread"], topk=1) == [
        "Doc 1(Title: Banana Bread) Banana bread is sweet bread.\n"
    ]
    with pytest.raises(ValueError, match="topk must be positive"):
        retriever.retrieve(["apple"], topk=0)
    with pytest.raises(TypeError, match="list of strings"):
        retriever.retrieve("apple")


@pytest.mark.parametrize(
    "scores, k, expected",
    [
        ([0, 3, 1, 3, 0, 2], 3, [1, 3, 5]),  # a tie at the top keeps row order
        ([5, 1, 1, 1, 0], 3, [0, 1, 2]),  # a tie across the cut keeps the lowest rows
        ([0, 0, 0, 0, 0], 2, [0, 1]),
        ([1, 2], 5, [1, 0]),
    ],
)
def test_top_k_rows_breaks_ties_by_row(scores, k, expected):
    from retrieval_service.bm25 import top_k_rows  # noqa: PLC0415 (back end and its optional dependency loaded on use)

    assert top_k_rows(np.array(scores, np.float32), k).tolist() == expected


GOOD = '{"id": "0", "contents": "A\\ntext"}'


@pytest.mark.parametrize(
    "lines, message",
    [
        ([GOOD, '{"id": "1"}'], r"line 2: missing field 'contents'"),
        ([GOOD, '{"contents": "x"}'], r"line 2: missing field 'id'"),
        ([GOOD, GOOD.replace('"0"', '"1"'), "this is not json"], r"line 3: not valid JSON"),
        ([], r"is empty: no documents"),
        (
            ['{"id": "7", "contents": "a"}', GOOD, '{"id": 7, "contents": "b"}'],
            r"line 3: duplicate id '7' \(first seen on line 1\)",
        ),
        ([GOOD, ""], r"line 2: empty line"),
        (['{"id": "0", "contents": ["a"]}'], r"line 1: field 'contents' must be a string"),
        (['{"id": null, "contents": "a"}'], r"line 1: field 'id' must be a string or an integer"),
        (['["0", "a"]'], r"line 1: expected a JSON object"),
    ],
)
def test_bad_corpus_is_rejected_naming_the_line(tmp_path, lines, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(CorpusError, match=message) as info:
        build_index(corpus, tmp_path / "index", "bm25", show_progress=False)
    assert str(corpus) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl"]  # nothing half-written


def test_bad_utf8_and_missing_file(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(GOOD.encode() + b"\n" + b'{"id": "1", "contents": "\xff"}\n')
    with pytest.raises(CorpusError, match="line 2: not valid UTF-8"):
        build_index(corpus, tmp_path / "index", "bm25", show_progress=False)
    with pytest.raises(CorpusError, match="does not exist"):
        build_index(tmp_path / "nope.jsonl", tmp_path / "index", "bm25", show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl"]


def test_build_index_cli_reports_errors(tmp_path, capsys):
    def run(args):
        with pytest.raises(SystemExit) as exit_info:
            build_index_cli.run_main(args)
        return exit_info.value.code

    corpus = write_jsonl(tmp_path / "corpus.jsonl", [GOOD, '{"id": "0", "contents": "again"}'])
    code = run(
        ["--corpus", corpus, "--out", str(tmp_path / "i"), "--kind", "bm25", "--no-progress"]
    )
    assert code == 2
    assert "line 2: duplicate id '0'" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    args = ["--corpus", good, "--out", str(tmp_path / "i"), "--kind", "bm25", "--no-progress"]
    assert run(args) == 0
    assert run(args) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert run(args + ["--overwrite"]) == 0


def test_dense_build_with_a_missing_encoder_leaves_nothing(tmp_path, corpus_path):
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        build_index(
            corpus_path,
            tmp_path / "dense",
            "dense",
            encoder=str(tmp_path / "no-model"),
            show_progress=False,
        )
    assert os.listdir(tmp_path) == []


def test_load_index_checks_the_directory(tmp_path, bm25_dir):
    with pytest.raises(IndexFormatError, match="manifest.json is missing"):
        InProcessRetriever(tmp_path)
    manifest = json.loads((bm25_dir / "manifest.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("documents.arrow",):
        (broken / name).write_bytes((bm25_dir / name).read_bytes())
    (broken / "manifest.json").write_text(json.dumps({**manifest, "num_documents": 6}))
    with pytest.raises(IndexFormatError, match="holds 5 documents, the manifest says 6"):
        InProcessRetriever(broken)


def test_e5_convention_detection():
    assert uses_e5_conventions("intfloat/e5-base-v2")
    assert uses_e5_conventions("/models/E5-large-v2/")
    assert not uses_e5_conventions("all-MiniLM-L6-v2")
    assert not uses_e5_conventions("/home/e5user/minilm")  # only the model's own name counts
    assert not uses_e5_conventions(None)


def _reference_mean_pooled(path, texts, max_length):
    """Mean pooling + L2 normalisation straight from transformers, for comparison."""
    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_e5_conventions_prefix_pool_and_normalise():
    path = resolve_encoder_path(None)
    encoder = TextEncoder(path, e5=True, num_threads=1)
    assert (encoder.max_length, encoder.query_prefix, encoder.passage_prefix) == (
        256,
        "query: ",
        "passage: ",
    )
    queries = [
        "who founded Avel Systems",
        "where was Kalo Venter born " * 80,
    ]  # the second is truncated
    expected = _reference_mean_pooled(path, ["query: " + text for text in queries], 256)
    np.testing.assert_allclose(encoder.encode_queries(queries), expected, atol=2e-5)
    expected = _reference_mean_pooled(path, ["passage: Kalo Venter\nKalo Venter is a poet."], 256)
    np.testing.assert_allclose(
        encoder.encode_passages(["Kalo Venter\nKalo Venter is a poet."]), expected, atol=2e-5
    )


def test_dense_index_matches_brute_force_cosine(corpus_path, tmp_path):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415 (retrieval extra, loaded on use)

    out = tmp_path / "dense"
    build_index(corpus_path, out, "dense", show_progress=False, torch_threads=1)
    manifest = IndexManifest.read(out)
    assert (manifest.kind, manifest.dimension, manifest.encoder["name"]) == (
        "dense",
        384,
        "all-MiniLM-L6-v2",
    )
    model = SentenceTransformer(resolve_encoder_path(None), device="cpu")
    passages = model.encode([row["contents"] for row in CORPUS], normalize_embeddings=True)
    queries = ["a sweet dessert with cream", "fruit trees", "a pond"]
    similarity = model.encode(queries, normalize_embeddings=True) @ passages.T
    retriever = InProcessRetriever(out, torch_threads=1)
    for query_row, documents in zip(similarity, retriever.retrieve(queries, topk=3)):
        order = np.argsort(-query_row)[:3]
        assert [doc.id for doc in documents] == [str(CORPUS[i]["id"]) for i in order]
        np.testing.assert_allclose([doc.score for doc in documents], query_row[order], atol=1e-5)
        assert isinstance(documents[0], Document)
    # HNSW (approximate; exact on five vectors) and an encoder path given at load time.
    build_index(
        corpus_path,
        tmp_path / "hnsw",
        "dense",
        faiss_index="hnsw",
        hnsw_m=8,
        show_progress=False,
        torch_threads=1,
    )
    assert IndexManifest.read(tmp_path / "hnsw").params["faiss_index"] == "hnsw"
    hnsw = InProcessRetriever(tmp_path / "hnsw", torch_threads=1)
    assert [[doc.id for doc in docs] for docs in hnsw.retrieve(queries, topk=3)] == [
        [doc.id for doc in docs] for docs in retriever.retrieve(queries, topk=3)
    ]

    moved = load_index(out, encoder=resolve_encoder_path(None), torch_threads=1)
    assert moved.search_documents(queries[:1], 2) == retriever.index.search_documents(
        queries[:1], 2
    )
