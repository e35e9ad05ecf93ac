"""The synthetic world: checked by re-reading its documents with independent parsers."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pyarrow.parquet as pq
import pytest

from dgpo_jax.data import synthetic
from dgpo_jax.data.synthetic import build_word_tokenizer, generate_world, write_world
from dgpo_jax.errors import InvalidArgumentError
from dgpo_jax.launch.quickstart import expert_turns
from dgpo_jax.retrieval import (
    INVALID_ACTION_NOTICE,
    Document,
    format_documents,
    information_observation,
)

# The documents' language, written out independently of the generator's templates.
PERSON = re.compile(
    r"(?P<name>[^\n]+)\n(?P=name) is an? (?P<profession>[a-z]+(?: [a-z]+)?) born in (?P<birthplace>[A-Z][^\n]*?) "
    r"in (?P<birth_year>\d{4})\. (?P=name) works for (?P<employer>[A-Z][^\n]*)\."
)
PLACE = re.compile(
    r"(?P<name>[^\n]+)\n(?P=name) is a town in the (?P<region>[A-Z][a-z]+(?: [A-Z][a-z]+)?) region\. "
    r"(?P=name) is known for its (?P<product>[a-z]+(?: [a-z]+)?)\."
)
ORGANISATION = re.compile(
    r"(?P<name>[^\n]+)\n(?P=name) is an? (?P<industry>[a-z]+(?: [a-z]+)?) company founded by "
    r"(?P<founder>[A-Z][^\n]*?) in (?P<founding_year>\d{4})\. The headquarters of "
    r"(?P=name) are in (?P<headquarters>[A-Z][^\n]*)\."
)

# Question pattern -> (attribute path): the first attribute is read from the subject's document,
# the second (two-hop) from the document of the entity the first one names.
QUESTIONS = [
    (
        r"where is the headquarters of the organisation (.+) works for\?",
        ("employer", "headquarters"),
    ),
    (r"who founded the organisation (.+) works for\?", ("employer", "founder")),
    (r"what is the birthplace of (.+) known for\?", ("birthplace", "product")),
    (r"in which region was (.+) born\?", ("birthplace", "region")),
    (r"where was the founder of (.+) born\?", ("founder", "birthplace")),
    (r"what is the profession of the founder of (.+)\?", ("founder", "profession")),
    (r"in which region is the headquarters of (.+)\?", ("headquarters", "region")),
    (r"where was (.+) born\?", ("birthplace",)),
    (r"which organisation does (.+) work for\?", ("employer",)),
    (r"what is the profession of (.+)\?", ("profession",)),
    (r"in which year was (.+) born\?", ("birth_year",)),
    (r"in which region is (.+)\?", ("region",)),
    (r"what is (.+) known for\?", ("product",)),
    (r"where is the headquarters of (.+)\?", ("headquarters",)),
    (r"who founded (.+)\?", ("founder",)),
    (r"what industry is (.+) in\?", ("industry",)),
    (r"in which year was (.+) founded\?", ("founding_year",)),
]


def read_encyclopedia(corpus):
    """name -> (doc id, kind, facts), parsed from the corpus text alone."""
    knowledge = {}
    for row in corpus:
        matches = [
            (kind, pattern.fullmatch(row["contents"]))
            for kind, pattern in (
                ("person", PERSON),
                ("place", PLACE),
                ("organisation", ORGANISATION),
            )
        ]
        matches = [(kind, match) for kind, match in matches if match]
        assert len(matches) == 1, (
            f"document {row['id']} has an unexpected shape: {row['contents']!r}"
        )
        kind, match = matches[0]
        facts = match.groupdict()
        name = facts.pop("name")
        assert name not in knowledge, f"two documents about {name}"
        knowledge[name] = (row["id"], kind, facts)
    return knowledge


def answer(question, knowledge):
    """(answer, ids of the documents read) for a question, by following the documents."""
    for pattern, path in QUESTIONS:
        match = re.fullmatch(pattern, question)
        if match:
            subject = match.group(1)
            doc_ids = []
            for attribute in path:
                doc_id, _, facts = knowledge[subject]
                doc_ids.append(doc_id)
                subject = facts[attribute]
            return subject, doc_ids
    raise AssertionError(f"unexpected question {question!r}")


@pytest.fixture(scope="module")
def world():
    return generate_world(seed=7, num_entities=500)


def test_sizes_kinds_and_ids(world):
    assert len(world.corpus) == len(world.entities) == 500
    assert [row["id"] for row in world.corpus] == [str(i) for i in range(500)]
    kinds = [kind for _, kind, _ in read_encyclopedia(world.corpus).values()]
    assert (kinds.count("person"), kinds.count("place"), kinds.count("organisation")) == (
        300,
        100,
        100,
    )
    assert 0.15 < len({e.doc_id for e in world.entities if e.split == "test"}) / 500 < 0.25


def test_every_answer_follows_from_the_documents(world):
    knowledge = read_encyclopedia(world.corpus)
    hops = {"synthetic_1hop": 1, "synthetic_2hop": 2}
    for split in ("train", "test"):
        for row in world.rows(split):
            expected_answer, doc_ids = answer(row["question"], knowledge)
            assert row["golden_answers"] == [expected_answer]
            assert row["extra_info"]["gold_doc_ids"] == doc_ids
            assert len(doc_ids) == hops[row["data_source"]] == row["extra_info"]["hops"]


def test_train_and_test_share_no_entity(world):
    knowledge = read_encyclopedia(world.corpus)
    names_by_doc = {doc_id: name for name, (doc_id, _, _) in knowledge.items()}

    def reachable(rows):
        """Every entity a split's questions lead to, following every link of every gold document."""
        seen, frontier = (
            set(),
            [names_by_doc[d] for row in rows for d in row["extra_info"]["gold_doc_ids"]],
        )
        while frontier:
            name = frontier.pop()
            if name not in seen:
                seen.add(name)
                frontier.extend(
                    value for value in knowledge[name][2].values() if value in knowledge
                )
        return seen

    train, test = reachable(world.train), reachable(world.test)
    assert train and test and not train & test
    assert len(train | test) == len(knowledge)  # every entity is asked about


def test_rows_follow_the_search_r1_format(world):
    assert {row["data_source"] for row in world.train} == {"synthetic_1hop", "synthetic_2hop"}
    for split in ("train", "test"):
        for index, row in enumerate(world.rows(split)):
            assert set(row) == {
                "id",
                "data_source",
                "question",
                "golden_answers",
                "prompt",
                "ability",
                "reward_model",
                "extra_info",
            }
            assert row["ability"] == "fact-reasoning"
            assert row["reward_model"] == {
                "style": "rule",
                "ground_truth": {"target": row["golden_answers"]},
            }
            assert (row["extra_info"]["split"], row["extra_info"]["index"]) == (split, index)
            (message,) = row["prompt"]
            assert message["role"] == "user" and row["question"].endswith("?")
            assert message["content"].startswith(
                "Answer the given question. You must conduct reasoning"
            )
            assert message["content"].endswith(
                f"<answer> Beijing </answer>. Question: {row['question']}\n"
            )
    counts = {"synthetic_1hop": 0, "synthetic_2hop": 0}
    for row in world.train + world.test:
        counts[row["data_source"]] += 1
    assert counts == {
        "synthetic_1hop": 500,
        "synthetic_2hop": 400,
    }  # places have no two-hop questions


def test_generation_is_deterministic_and_seeded():
    first, again = generate_world(seed=3, num_entities=60), generate_world(seed=3, num_entities=60)
    assert (first.corpus, first.train, first.test) == (again.corpus, again.train, again.test)
    other = generate_world(seed=4, num_entities=60)
    assert other.corpus != first.corpus


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_entities": 19}, "at least 20"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \(0, 1\)"),
        ({"two_hop_per_entity": 4}, "two_hop_per_entity must be between 0 and 3"),
    ],
)
def test_bad_sizes_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_world(**kwargs)


def test_smallest_world_still_has_both_splits():
    world = generate_world(seed=0, num_entities=20)
    assert world.train and world.test
    read_encyclopedia(world.corpus)


def test_write_world_round_trips(world, tmp_path):
    paths = write_world(world, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [
        "corpus.jsonl",
        "test.parquet",
        "train.parquet",
        "world.json",
    ]
    with open(paths["corpus.jsonl"], encoding="utf-8") as handle:
        assert [json.loads(line) for line in handle] == world.corpus
    for split in ("train", "test"):
        assert pq.read_table(paths[f"{split}.parquet"]).to_pylist() == world.rows(split)
    summary = json.loads(open(paths["world.json"]).read())
    assert summary["num_documents"] == 500 and summary["seed"] == 7


def test_cli_writes_world_and_tokenizer(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--num-entities", "40", "--seed", "2"]) == 0
    assert {"corpus.jsonl", "train.parquet", "test.parquet", "world.json", "tokenizer"} <= set(
        os.listdir(tmp_path)
    )
    assert "40 documents" in capsys.readouterr().out


@pytest.fixture(scope="module")
def default_world_tokenizer(tmp_path_factory):
    default_world = generate_world()
    out = tmp_path_factory.mktemp("tokenizer")
    build_word_tokenizer(default_world, out)
    return default_world, out


def test_word_tokenizer_is_small_and_loads_with_transformers(default_world_tokenizer):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    default_world, out = default_world_tokenizer
    assert len(default_world.corpus) == 3000
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    auto = AutoTokenizer.from_pretrained(out)
    fast = PreTrainedTokenizerFast.from_pretrained(out)
    assert len(auto) == len(fast) < 2000
    specials = [
        "<pad>",
        "<unk>",
        "<bos>",
        "<eos>",
        "<think>",
        "</think>",
        "<search>",
        "</search>",
        "<information>",
        "</information>",
        "<answer>",
        "</answer>",
    ]
    assert auto.convert_tokens_to_ids(specials) == list(range(12))
    assert (auto.pad_token_id, auto.unk_token_id, auto.bos_token_id, auto.eos_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert set(specials) <= set(auto.all_special_tokens)


def test_word_tokenizer_covers_the_protocol_text(default_world_tokenizer):
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    default_world, out = default_world_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(out)
    documents = [Document(row["id"], row["contents"]) for row in default_world.corpus[:5]]
    texts = (
        [row["contents"] for row in default_world.corpus]
        + [row["prompt"][0]["content"] for row in default_world.train + default_world.test]
        + [
            information_observation(format_documents(documents)),
            INVALID_ACTION_NOTICE,
            "<think> I need to search . </think> <search> "
            + default_world.test[0]["question"]
            + " </search> <answer> "
            + default_world.test[0]["golden_answers"][0]
            + " </answer>",
        ]
    )
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer(tokenizer.decode(ids), add_special_tokens=False).input_ids == ids


def test_word_tokenizer_takes_extra_texts(tmp_path):
    small = generate_world(seed=1, num_entities=40)
    tokenizer = build_word_tokenizer(small, extra_texts=["Hmm, perhaps Zyx!"])
    ids = tokenizer("Hmm, perhaps Zyx!").input_ids
    assert tokenizer.unk_token_id not in ids and len(ids) == 5
    assert tokenizer.unk_token_id in build_word_tokenizer(small)("perhaps").input_ids


def test_word_tokenizer_splits_words_punctuation_and_tags(default_world_tokenizer):
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    default_world, out = default_world_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(out)
    name = default_world.entities[0].name
    first, last = name.split(" ")
    text = f"Doc 12(Title: {name}) born.\n\n<search>{first}</search>"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
    assert tokens == [
        "Doc",
        "12",
        "(",
        "Title",
        ":",
        first,
        last,
        ")",
        "born",
        ".",
        "\n",
        "\n",
        "<search>",
        first,
        "</search>",
    ]
    assert tokenizer.convert_ids_to_tokens(tokenizer("Zzyzx qq").input_ids) == ["<unk>", "<unk>"]


def test_evidence_quotes_the_sentence_up_to_the_answer():
    kalo = synthetic.Entity(
        index=0,
        kind="person",
        name="Kalo Venter",
        split="train",
        doc_id="0",
        facts={
            "profession": "engineer",
            "birthplace": "Port Avel",
            "birth_year": "1954",
            "employer": "Dumi Systems",
        },
        links={},
    )
    assert (
        synthetic.evidence(kalo, "1954") == "Kalo Venter is an engineer born in Port Avel in 1954"
    )
    assert synthetic.evidence(kalo, "engineer") == "Kalo Venter is an engineer"
    assert synthetic.evidence(kalo, "Dumi Systems") == "Kalo Venter works for Dumi Systems"
    with pytest.raises(ValueError, match="does not state '195'"):
        synthetic.evidence(kalo, "195")  # a whole word, not part of one


def test_expert_quotes_the_last_document_then_answers(world):
    knowledge = read_encyclopedia(world.corpus)
    text_by_doc = {row["id"]: row["contents"] for row in world.corpus}
    names_by_doc = {doc_id: name for name, (doc_id, _, _) in knowledge.items()}
    for row in world.train + world.test:
        turns, queries = expert_turns(world, row)
        gold = row["extra_info"]["gold_doc_ids"]
        assert queries == [names_by_doc[d] for d in gold]
        match = re.fullmatch(r"<think> (.+) </think> <answer> (.+) </answer>", turns[-1])
        quote, said = match.groups()
        assert said == row["golden_answers"][0] and quote.endswith(" " + said)
        # The quote opens a sentence of the last document read.
        sentences = text_by_doc[gold[-1]].split("\n", 1)[1].split(". ")
        assert any(sentence.startswith(quote) for sentence in sentences), (quote, sentences)


# ------------------------------------------------------------------------ answer classes ---
def _row(split, question_type, source, answer):
    return {
        "data_source": source,
        "golden_answers": [answer],
        "extra_info": {"split": split, "question_type": question_type},
    }


def test_answer_statistics_by_hand():
    # Type a: train x, x, y (majority x, 2/3); test x, z -> guessing x scores 1/2.
    # Type b: train u (1/1); test v -> 0. Test overall: 1 of 3 guessed.
    train = [
        _row("train", "a", "s1", "x"),
        _row("train", "a", "s1", "x"),
        _row("train", "a", "s1", "y"),
        _row("train", "b", "s2", "u"),
    ]
    test = [
        _row("test", "a", "s1", "x"),
        _row("test", "a", "s1", "z"),
        _row("test", "b", "s2", "v"),
    ]
    world = synthetic.World(seed=0, entities=(), corpus=[], train=train, test=test)
    stats = synthetic.answer_statistics(world)
    assert stats["question_types"]["a"] == {
        "train_questions": 3,
        "distinct_answers": 2,
        "majority_share": round(2 / 3, 4),
        "test_questions": 2,
        "majority_test_em": 0.5,
    }
    assert stats["question_types"]["b"]["majority_share"] == 1.0
    assert stats["question_types"]["b"]["majority_test_em"] == 0.0
    assert stats["data_sources"]["s1"]["majority_share"] == round(2 / 3, 4)
    assert stats["majority_test_em"] == round(1 / 3, 4)


def test_open_answers_do_not_repeat_and_follow_from_the_documents():
    closed = generate_world(seed=5, num_entities=300)
    world = generate_world(seed=5, num_entities=300, answers="open")
    # The documents still read the same way, and every answer follows from them.
    knowledge = read_encyclopedia(world.corpus)
    for row in world.train + world.test:
        assert row["golden_answers"] == [answer(row["question"], knowledge)[0]]
    # Professions, industries, regions and products: one value per entity, two words that also
    # occur in other values (so in training answers), never a value of the closed lists.
    train_words = {w for row in world.train for w in row["golden_answers"][0].split()}
    for attribute in ("profession", "industry", "region", "product"):
        values = [e.facts[attribute] for e in world.entities if attribute in e.facts]
        assert len(set(values)) == len(values) > 0, attribute
        assert all(len(v.split()) == 2 for v in values), attribute
        closed_values = {e.facts[attribute] for e in closed.entities if attribute in e.facts}
        assert not set(values) & closed_values, attribute
    held_out_words = [w for row in world.test for w in row["golden_answers"][0].split()]
    assert sum(w in train_words for w in held_out_words) / len(held_out_words) > 0.9
    # Guessing a type's most frequent training answer: some EM in the closed world; in the open
    # one only years are ever guessed (they span two centuries).
    assert synthetic.answer_statistics(closed)["majority_test_em"] > 0.01
    stats = synthetic.answer_statistics(world)
    assert stats["majority_test_em"] < 0.01
    for question_type, row in stats["question_types"].items():
        if not question_type.endswith("year"):
            assert row["majority_test_em"] == 0.0, question_type
    with pytest.raises(InvalidArgumentError, match="answers must be one of"):
        generate_world(seed=5, num_entities=300, answers="half-open")


def test_closed_world_is_the_world_from_before_the_answers_option():
    # The digest of generate_world(seed=2, num_entities=80) as written before `answers` existed
    # (2026-12-03): the quickstart's recorded results are on that world.
    world = generate_world(seed=2, num_entities=80, answers="closed")
    text = json.dumps([world.corpus, world.train, world.test], sort_keys=True).encode()
    assert hashlib.sha256(text).hexdigest() == (
        "87b42b8327aa508b7c306d725fea422ecb03371d6be56fa2c26080b116fe80f1"
    )
