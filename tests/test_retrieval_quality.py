"""Retrieval quality on the synthetic world: the gold document of single-hop questions is found."""

from __future__ import annotations

import numpy as np
import pytest

from dgpo_jax.data.synthetic import generate_world, write_world
from dgpo_jax.retrieval import InProcessRetriever
from retrieval_service.index import build_index

NUM_DOCUMENTS = 2000
# One torch thread: on small shared CPUs torch's spinning worker threads make encoding many
# times slower (see docs/retrieval.md).
TORCH_THREADS = 1
DENSE_QUESTIONS = 600  # a random sample, to keep query encoding short on CPU


@pytest.fixture(scope="module")
def world_and_corpus(tmp_path_factory):
    world = generate_world(seed=11, num_entities=NUM_DOCUMENTS)
    out = tmp_path_factory.mktemp("quality")
    paths = write_world(world, out)
    return world, paths["corpus.jsonl"], out


def recall_at_3(retriever, rows) -> float:
    results = retriever.retrieve([row["question"] for row in rows], topk=3)
    hits = [
        row["extra_info"]["gold_doc_ids"][0] in {doc.id for doc in documents}
        for row, documents in zip(rows, results)
    ]
    return float(np.mean(hits))


def single_hop_rows(world):
    rows = [row for row in world.train + world.test if row["data_source"] == "synthetic_1hop"]
    assert len(rows) == NUM_DOCUMENTS  # one single-hop question per entity
    return rows


def test_bm25_recall_at_3_on_single_hop_questions(world_and_corpus):
    world, corpus, out = world_and_corpus
    build_index(corpus, out / "bm25", "bm25", show_progress=False)
    recall = recall_at_3(InProcessRetriever(out / "bm25"), single_hop_rows(world))
    print(f"bm25 recall@3 = {recall:.4f}")
    assert recall >= 0.9


def test_dense_recall_at_3_on_single_hop_questions(world_and_corpus):
    world, corpus, out = world_and_corpus
    build_index(
        corpus,
        out / "dense",
        "dense",
        batch_size=64,
        show_progress=False,
        torch_threads=TORCH_THREADS,
    )
    rows = single_hop_rows(world)
    sample = [
        rows[i] for i in np.random.default_rng(0).choice(len(rows), DENSE_QUESTIONS, replace=False)
    ]
    recall = recall_at_3(InProcessRetriever(out / "dense", torch_threads=TORCH_THREADS), sample)
    print(f"dense recall@3 = {recall:.4f}")
    assert recall >= 0.9
