"""A fictional encyclopedia to train and test search agents on, deterministic from a seed.

People, places and organisations with attributes and links between them, written as one
corpus document each in templated language::

    Kalo Venter
    Kalo Venter is an engineer born in Port Avel in 1954. Kalo Venter works for Dumi Systems.

Questions come in the Search-R1 parquet row format: single-hop ("where was Kalo Venter born?",
one search finds the answer) and two-hop ("where is the headquarters of the organisation Kalo
Venter works for?", the first answer is needed to form the second query). Every entity belongs
to the train or the test split and links only to entities of its own split, so no test question
touches an entity of a training question. Names are invented, so the answers can only be found
by retrieval. `evidence` gives the words of a document that state an answer (what a scripted
expert quotes); `build_word_tokenizer` turns the world's words into a small word-level
tokenizer.

    python -m dgpo_jax.data.synthetic --out workdir/synthetic [--seed 0] [--num-entities 3000]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dgpo_jax.checkpoint.fileio import write_atomically
from dgpo_jax.errors import InvalidArgumentError, OutputExistsError, run_cli
from dgpo_jax.retrieval.formatting import (
    INVALID_ACTION_NOTICE,
    PROTOCOL_TAGS,
    SEARCH_R1_PROMPT_TEMPLATE,
    format_prompt,
)

PERSON, PLACE, ORGANISATION = "person", "place", "organisation"
SPLITS = ("train", "test")

PROFESSIONS = (
    "engineer",
    "painter",
    "doctor",
    "teacher",
    "pilot",
    "farmer",
    "lawyer",
    "chemist",
    "architect",
    "baker",
    "sailor",
    "poet",
    "judge",
    "nurse",
    "banker",
    "carpenter",
    "singer",
    "writer",
    "librarian",
    "astronomer",
    "tailor",
    "miner",
    "potter",
    "surgeon",
)
INDUSTRIES = (
    "shipping",
    "banking",
    "mining",
    "software",
    "textile",
    "publishing",
    "farming",
    "brewing",
    "aviation",
    "insurance",
    "robotics",
    "energy",
    "retail",
    "construction",
    "glassmaking",
    "printing",
)
PRODUCTS = (
    "glass",
    "wine",
    "salt",
    "silk",
    "cheese",
    "timber",
    "copper",
    "wool",
    "pottery",
    "honey",
    "marble",
    "tea",
    "leather",
    "paper",
    "olives",
    "clocks",
    "boats",
    "lace",
    "cider",
    "bells",
)
PLACE_PREFIXES = (
    "Port",
    "Lake",
    "Mount",
    "Fort",
    "Glen",
    "Saint",
    "North",
    "South",
    "East",
    "West",
    "New",
    "Old",
)
ORG_SUFFIXES = (
    "Systems",
    "Labs",
    "Works",
    "Group",
    "Holdings",
    "Partners",
    "Industries",
    "Trading",
    "Foundry",
    "Studios",
    "Press",
    "Mills",
)
_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "st",
    "tr",
    "sh",
    "th",
)
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s")

# How attribute values are drawn (`generate_world`'s ``answers``).
ANSWER_CLASSES = ("closed", "open")
# (question type, template, attribute) per entity kind; the answer is the subject's attribute.
SINGLE_HOP = {
    PERSON: (
        ("person_birthplace", "where was {name} born?", "birthplace"),
        ("person_employer", "which organisation does {name} work for?", "employer"),
        ("person_profession", "what is the profession of {name}?", "profession"),
        ("person_birth_year", "in which year was {name} born?", "birth_year"),
    ),
    PLACE: (
        ("place_region", "in which region is {name}?", "region"),
        ("place_product", "what is {name} known for?", "product"),
    ),
    ORGANISATION: (
        ("organisation_headquarters", "where is the headquarters of {name}?", "headquarters"),
        ("organisation_founder", "who founded {name}?", "founder"),
        ("organisation_industry", "what industry is {name} in?", "industry"),
        ("organisation_founding_year", "in which year was {name} founded?", "founding_year"),
    ),
}
# (question type, template, link to follow, attribute of the linked entity).
TWO_HOP = {
    PERSON: (
        (
            "person_employer_headquarters",
            "where is the headquarters of the organisation {name} works for?",
            "employer",
            "headquarters",
        ),
        (
            "person_employer_founder",
            "who founded the organisation {name} works for?",
            "employer",
            "founder",
        ),
        ("person_birthplace_region", "in which region was {name} born?", "birthplace", "region"),
        (
            "person_birthplace_product",
            "what is the birthplace of {name} known for?",
            "birthplace",
            "product",
        ),
    ),
    PLACE: (),
    ORGANISATION: (
        (
            "organisation_founder_birthplace",
            "where was the founder of {name} born?",
            "founder",
            "birthplace",
        ),
        (
            "organisation_founder_profession",
            "what is the profession of the founder of {name}?",
            "founder",
            "profession",
        ),
        (
            "organisation_headquarters_region",
            "in which region is the headquarters of {name}?",
            "headquarters",
            "region",
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class Entity:
    """One person, place or organisation.

    Attributes:
      facts: attribute -> answer string (linked entities appear by name).
      links: attribute -> index in `World.entities` of the linked entity.
    """

    index: int
    kind: str
    name: str
    split: str
    doc_id: str
    facts: dict
    links: dict


@dataclasses.dataclass(frozen=True)
class World:
    """A generated world: entities, corpus rows and question rows per split."""

    seed: int
    entities: tuple[Entity, ...]
    corpus: list[dict]
    train: list[dict]
    test: list[dict]

    def rows(self, split: str) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}, expected one of {SPLITS}")
        return self.train if split == "train" else self.test


# Words of the document templates in `_document_text`.
_DOCUMENT_WORDS = {
    "is",
    "a",
    "an",
    "born",
    "in",
    "works",
    "for",
    "town",
    "the",
    "region",
    "known",
    "its",
    "company",
    "founded",
    "by",
    "headquarters",
    "of",
    "are",
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _invented_words(rng: np.random.Generator, count: int, reserved: set[str]) -> list[str]:
    """`count` distinct capitalised two- or three-syllable words, none of them in `reserved`."""
    words: list[str] = []
    seen = set(reserved)
    while len(words) < count:
        syllables = rng.choice([2, 2, 2, 3])
        word = "".join(
            _ONSETS[rng.integers(len(_ONSETS))]
            + _VOWELS[rng.integers(len(_VOWELS))]
            + _CODAS[rng.integers(len(_CODAS))]
            for _ in range(syllables)
        )
        if word not in seen:
            seen.add(word)
            words.append(word.capitalize())
    return words


def _distinct_pairs(
    rng: np.random.Generator, first: list[str], second: list[str], count: int
) -> list[str]:
    chosen = rng.choice(len(first) * len(second), size=count, replace=False)
    return [f"{first[i // len(second)]} {second[i % len(second)]}" for i in chosen]


def _document_text(entity: Entity) -> str:
    name, facts = entity.name, entity.facts
    if entity.kind == PERSON:
        body = (
            f"{name} is {_article(facts['profession'])} {facts['profession']} born in "
            f"{facts['birthplace']} in {facts['birth_year']}. {name} works for {facts['employer']}."
        )
    elif entity.kind == PLACE:
        body = (
            f"{name} is a town in the {facts['region']} region. "
            f"{name} is known for its {facts['product']}."
        )
    else:
        body = (
            f"{name} is {_article(facts['industry'])} {facts['industry']} company founded by "
            f"{facts['founder']} in {facts['founding_year']}. "
            f"The headquarters of {name} are in {facts['headquarters']}."
        )
    return f"{name}\n{body}"


def evidence(entity: Entity, answer: str) -> str:
    """The sentence of ``entity``'s document that states ``answer``, cut after the answer.

    ``evidence(kalo, "1954")`` is "Kalo Venter is an engineer born in Port Avel in 1954": the
    words a reader quotes to justify the answer. Raises ValueError when the document does not
    state ``answer``.
    """
    body = _document_text(entity).split("\n", 1)[1]
    for sentence in re.split(r"(?<=\.) ", body):
        found = re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", sentence)
        if found:
            return sentence[: found.end()]
    raise ValueError(f"the document of {entity.name!r} does not state {answer!r}")


def _question_row(
    data_source: str,
    split: str,
    question_type: str,
    question: str,
    answer: str,
    gold_doc_ids: list[str],
    prompt_template: str,
) -> dict:
    question = question.strip()
    return {
        "data_source": data_source,
        "question": question,
        "golden_answers": [answer],
        "prompt": [{"role": "user", "content": format_prompt(question, prompt_template)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": [answer]}},
        "extra_info": {
            "split": split,
            "index": -1,
            "question_type": question_type,
            "hops": len(gold_doc_ids),
            "gold_doc_ids": gold_doc_ids,
        },
    }


def generate_world(
    seed: int = 0,
    num_entities: int = 3000,
    *,
    test_fraction: float = 0.2,
    single_hop_per_entity: int = 1,
    two_hop_per_entity: int = 1,
    prompt_template: str = SEARCH_R1_PROMPT_TEMPLATE,
    answers: str = "closed",
) -> World:
    """Generates a world of `num_entities` entities (one corpus document each).

    Args:
      seed: the same seed and sizes give the same world.
      num_entities: 60% people, 20% places, 20% organisations (at least 20 in all).
      test_fraction: share of each kind of entity in the test split.
      single_hop_per_entity / two_hop_per_entity: questions asked about each entity (distinct
        question types, drawn at random; places have no two-hop questions).
      prompt_template: template with a ``{question}`` placeholder for the prompt rows.
      answers: "closed": professions, industries and products from short fixed lists, a few
        dozen regions, years from a span of decades (a question type's most frequent answer
        covers up to ~20% of its questions); "open": each profession, industry, product and
        region is a pair of invented words of its own entity (its words recur in other
        values, as name parts do) and years span two centuries, so no held-out answer but a
        year is a training answer (as in open-domain QA, where the most frequent answer
        covers well under 1%). `answer_statistics` measures it.
    """
    if answers not in ANSWER_CLASSES:
        raise InvalidArgumentError(f"answers must be one of {ANSWER_CLASSES}, got {answers!r}")
    if num_entities < 20:
        raise InvalidArgumentError(f"num_entities must be at least 20, got {num_entities}")
    if not 0.0 < test_fraction < 1.0:
        raise InvalidArgumentError(f"test_fraction must be in (0, 1), got {test_fraction}")
    for name, value, limit in (
        ("single_hop_per_entity", single_hop_per_entity, 2),
        ("two_hop_per_entity", two_hop_per_entity, 3),
    ):
        if not 0 <= value <= limit:
            raise InvalidArgumentError(f"{name} must be between 0 and {limit}, got {value}")
    rng = np.random.default_rng(seed)
    counts = {PERSON: round(0.6 * num_entities), PLACE: round(0.2 * num_entities)}
    counts[ORGANISATION] = num_entities - counts[PERSON] - counts[PLACE]

    # Names: invented words, disjoint between name parts, drawn so that at most half of the
    # possible combinations are used (names stay unique and not too crowded).
    template_text = " ".join(
        [
            SEARCH_R1_PROMPT_TEMPLATE,
            INVALID_ACTION_NOTICE,
            *PROFESSIONS,
            *INDUSTRIES,
            *PRODUCTS,
            *PLACE_PREFIXES,
            *ORG_SUFFIXES,
        ]
        + [question[1] for kind in SINGLE_HOP for question in SINGLE_HOP[kind]]
        + [question[1] for kind in TWO_HOP for question in TWO_HOP[kind]]
    )
    reserved = set(re.findall(r"[a-z]+", template_text.lower())) | _DOCUMENT_WORDS
    name_parts = math.ceil(math.sqrt(2 * counts[PERSON]))
    place_roots = math.ceil(2 * counts[PLACE] / len(PLACE_PREFIXES))
    org_roots = math.ceil(2 * counts[ORGANISATION] / len(ORG_SUFFIXES))
    num_regions = max(4, math.ceil(counts[PLACE] / 25))
    pool = _invented_words(rng, 2 * name_parts + place_roots + org_roots + num_regions, reserved)
    given, pool = pool[:name_parts], pool[name_parts:]
    family, pool = pool[:name_parts], pool[name_parts:]
    place_root_words, pool = pool[:place_roots], pool[place_roots:]
    org_root_words, regions = pool[:org_roots], pool[org_roots:]
    # Open-class answers: each value a pair of invented words, distinct per entity (as names
    # are): the pair is new, its words recur across values, so every word of a held-out answer
    # is also seen in training answers (a word-level model can write it). Drawn after the
    # closed world's words, so a closed world is the same as before this option existed.
    open_values: dict[str, Iterator[str]] = {}
    if answers == "open":
        taken = {w.lower() for w in given + family + place_root_words + org_root_words + regions}
        for attribute, kind in (
            ("profession", PERSON),
            ("region", PLACE),
            ("product", PLACE),
            ("industry", ORGANISATION),
        ):
            side = math.ceil(math.sqrt(2 * counts[kind]))
            words = _invented_words(rng, 2 * side, reserved | taken)
            taken |= {w.lower() for w in words}
            if attribute != "region":
                words = [w.lower() for w in words]
            open_values[attribute] = iter(
                _distinct_pairs(rng, words[:side], words[side:], counts[kind])
            )
    names = {
        PERSON: _distinct_pairs(rng, given, family, counts[PERSON]),
        PLACE: _distinct_pairs(rng, list(PLACE_PREFIXES), place_root_words, counts[PLACE]),
        ORGANISATION: _distinct_pairs(
            rng, org_root_words, list(ORG_SUFFIXES), counts[ORGANISATION]
        ),
    }

    # Splits: per kind, a random test_fraction of the entities (at least one per split).
    kinds = (
        [PERSON] * counts[PERSON] + [PLACE] * counts[PLACE] + [ORGANISATION] * counts[ORGANISATION]
    )
    entity_names = names[PERSON] + names[PLACE] + names[ORGANISATION]
    splits = [""] * num_entities
    members: dict[tuple[str, str], list[int]] = {}
    offset = 0
    for kind in (PERSON, PLACE, ORGANISATION):
        order = offset + rng.permutation(counts[kind])
        num_test = min(max(1, round(counts[kind] * test_fraction)), counts[kind] - 1)
        for position, index in enumerate(order):
            splits[index] = "test" if position < num_test else "train"
        for split in SPLITS:
            members[(kind, split)] = sorted(int(i) for i in order if splits[i] == split)
        offset += counts[kind]
    doc_ids = [""] * num_entities
    for position, index in enumerate(rng.permutation(num_entities)):
        doc_ids[index] = str(position)

    def pick(kind: str, split: str) -> int:
        candidates = members[(kind, split)]
        return candidates[rng.integers(len(candidates))]

    closed_values = {
        "profession": PROFESSIONS,
        "region": regions,
        "product": PRODUCTS,
        "industry": INDUSTRIES,
    }

    def value(attribute: str) -> str:
        if answers == "open":
            return next(open_values[attribute])
        choices = closed_values[attribute]
        return choices[rng.integers(len(choices))]

    def year(closed_from: int) -> str:
        return str(int(rng.integers(1800 if answers == "open" else closed_from, 2000)))

    links: list[dict] = []
    facts: list[dict] = []
    for index, kind in enumerate(kinds):
        split = splits[index]
        if kind == PERSON:
            link = {"birthplace": pick(PLACE, split), "employer": pick(ORGANISATION, split)}
            fact = {"profession": value("profession"), "birth_year": year(1920)}
        elif kind == PLACE:
            link = {}
            fact = {"region": value("region"), "product": value("product")}
        else:
            link = {"headquarters": pick(PLACE, split), "founder": pick(PERSON, split)}
            fact = {"industry": value("industry"), "founding_year": year(1850)}
        links.append(link)
        facts.append(fact)
    entities = tuple(
        Entity(
            index=i,
            kind=kinds[i],
            name=entity_names[i],
            split=splits[i],
            doc_id=doc_ids[i],
            facts={**facts[i], **{key: entity_names[j] for key, j in links[i].items()}},
            links=links[i],
        )
        for i in range(num_entities)
    )

    corpus = sorted(
        ({"id": entity.doc_id, "contents": _document_text(entity)} for entity in entities),
        key=lambda row: int(row["id"]),
    )

    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for entity in entities:
        single = SINGLE_HOP[entity.kind]
        for choice in rng.choice(
            len(single), size=min(single_hop_per_entity, len(single)), replace=False
        ):
            question_type, template, attribute = single[choice]
            rows[entity.split].append(
                _question_row(
                    "synthetic_1hop",
                    entity.split,
                    question_type,
                    template.format(name=entity.name),
                    entity.facts[attribute],
                    [entity.doc_id],
                    prompt_template,
                )
            )
        double = TWO_HOP[entity.kind]
        for choice in rng.choice(
            len(double), size=min(two_hop_per_entity, len(double)), replace=False
        ):
            question_type, template, link, attribute = double[choice]
            middle = entities[entity.links[link]]
            rows[entity.split].append(
                _question_row(
                    "synthetic_2hop",
                    entity.split,
                    question_type,
                    template.format(name=entity.name),
                    middle.facts[attribute],
                    [entity.doc_id, middle.doc_id],
                    prompt_template,
                )
            )
    for split in SPLITS:
        rows[split] = [rows[split][i] for i in rng.permutation(len(rows[split]))]
        for index, row in enumerate(rows[split]):
            row["extra_info"]["index"] = index
            row["id"] = f"{split}_{index}"
    return World(
        seed=seed, entities=entities, corpus=corpus, train=rows["train"], test=rows["test"]
    )


def answer_statistics(world: World) -> dict:
    """How much a question's type alone tells about its answer: per question type (and per
    data source) of the training questions, the number of questions, of distinct answers, and
    the share of the most frequent answer (``majority_share``); and ``majority_test_em``: the
    EM on the test questions of always answering the most frequent training answer of the
    question's type (what a policy that never reads gets by guessing well)."""

    def counts(rows, key):
        out: dict[str, Counter] = {}
        for row in rows:
            out.setdefault(key(row), Counter())[row["golden_answers"][0]] += 1
        return out

    def by_type(row):
        return row["extra_info"]["question_type"]

    out = {}
    for name, key in (("question_types", by_type), ("data_sources", lambda r: r["data_source"])):
        train, test = counts(world.train, key), counts(world.test, key)
        out[name] = {}
        for group in sorted(set(train) | set(test)):
            c, t = train.get(group, Counter()), test.get(group, Counter())
            top = c.most_common(1)[0] if c else ("", 0)
            n_train, n_test = sum(c.values()), sum(t.values())
            out[name][group] = {
                "train_questions": n_train,
                "distinct_answers": len(c),
                "majority_share": round(top[1] / n_train, 4) if n_train else 0.0,
                "test_questions": n_test,
                "majority_test_em": round(t[top[0]] / n_test, 4) if n_test else 0.0,
            }
    guessed = 0
    train_types = counts(world.train, by_type)
    for row in world.test:
        c = train_types.get(by_type(row))
        guessed += bool(c) and c.most_common(1)[0][0] == row["golden_answers"][0]
    out["majority_test_em"] = round(guessed / len(world.test), 4) if world.test else 0.0
    return out


def write_world(world: World, out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes corpus.jsonl, train.parquet, test.parquet and world.json (sizes, seed) to `out_dir`.

    Each file is written under a temporary name and renamed when complete. Returns the paths.
    """

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        name: os.path.join(out_dir, name)
        for name in ("corpus.jsonl", "train.parquet", "test.parquet", "world.json")
    }

    def write_corpus(path):
        with open(path, "w", encoding="utf-8") as handle:
            for row in world.corpus:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_atomically(paths["corpus.jsonl"], write_corpus)
    for split in SPLITS:
        table = pa.Table.from_pylist(world.rows(split))
        write_atomically(
            paths[f"{split}.parquet"], lambda path, table=table: pq.write_table(table, path)
        )
    summary = {
        "seed": world.seed,
        "num_documents": len(world.corpus),
        "entities": dict(Counter(entity.kind for entity in world.entities)),
        "questions": {
            split: dict(Counter(row["data_source"] for row in world.rows(split)))
            for split in SPLITS
        },
        "answer_statistics": answer_statistics(world),
    }

    def write_summary(path):
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, sort_keys=True)

    write_atomically(paths["world.json"], write_summary)
    return paths


# ---------------------------------------------------------------------------------------------
# Word-level tokenizer
# ---------------------------------------------------------------------------------------------

PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN) + PROTOCOL_TAGS
_TAG_SPLIT = re.compile("(" + "|".join(re.escape(tag) for tag in PROTOCOL_TAGS) + ")")
# Document numbers the observation text can show ("Doc 1(Title: ...").
MAX_DOC_NUMBER = 20
# Words for short reasoning inside <think> (e.g. templated demonstrations), beyond the world's own.
THINK_WORDS = (
    "I",
    "need",
    "to",
    "find",
    "search",
    "for",
    "first",
    "then",
    "now",
    "know",
    "so",
    "the",
    "answer",
    "is",
    "it",
    "says",
    "that",
    "which",
    "who",
    "where",
    "what",
    "when",
    "document",
    "documents",
    "found",
    "not",
    "yet",
    "look",
    "up",
    "next",
    "of",
    "was",
    "in",
    "and",
    "Let",
    "me",
    "The",
    "So",
    "Now",
    "First",
)


def word_pre_tokenizer():
    """Newlines become tokens, other whitespace separates words, punctuation stands alone."""
    from tokenizers import Regex, pre_tokenizers  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )


def _protocol_texts(world: World) -> Iterable[str]:
    """Every text the tokenizer must cover: documents, prompts, answers and the protocol's text."""
    for row in world.corpus:
        yield row["contents"]
    for split in SPLITS:
        for row in world.rows(split):
            yield row["prompt"][0]["content"]
            yield from row["golden_answers"]
    yield SEARCH_R1_PROMPT_TEMPLATE.replace("{question}", "")
    yield INVALID_ACTION_NOTICE
    yield " ".join(f"Doc {i}(Title: x)" for i in range(1, MAX_DOC_NUMBER + 1))
    yield " ".join(THINK_WORDS)


def build_word_tokenizer(
    world: World, out_dir: str | os.PathLike | None = None, extra_texts: Iterable[str] = ()
):
    """A word-level tokenizer covering every text of `world` and the protocol's own text.

    Also covered: `THINK_WORDS` and every word of `extra_texts` (say, the text of templated
    demonstrations the tokenizer must encode without unknown tokens).

    Special tokens: <pad>, <unk>, <bos>, <eos> and the protocol tags (<think>, </think>,
    <search>, </search>, <information>, </information>, <answer>, </answer>), ids 0-11. Words
    follow, most frequent first. Decoding joins tokens with spaces (then tidies the space before
    punctuation); encoding a decoded text gives the same ids back. Decode with
    ``skip_special_tokens=False`` to keep the tags.

    Returns a `transformers.PreTrainedTokenizerFast`; with `out_dir`, also saves it there
    (tokenizer.json + tokenizer_config.json, loadable with AutoTokenizer.from_pretrained).
    """
    from tokenizers import AddedToken, Tokenizer, models  # noqa: PLC0415 (transformers is slow to import; loaded on use)
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    pre_tokenizer = word_pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in itertools.chain(_protocol_texts(world), extra_texts):
        for piece in _TAG_SPLIT.split(text):
            if piece and piece not in PROTOCOL_TAGS:
                counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(piece))
    words = sorted(counts, key=lambda word: (-counts[word], word))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizer
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=list(PROTOCOL_TAGS),
        model_max_length=8192,
        clean_up_tokenization_spaces=True,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dgpo_jax.data.synthetic",
        description="Writes a synthetic world: corpus, questions, tokenizer.",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-entities", type=int, default=3000, help="= number of documents")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument(
        "--answers",
        choices=ANSWER_CLASSES,
        default="closed",
        help="closed: values from short lists (frequent answers); open: values that do not repeat",
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="skip the word tokenizer")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise OutputExistsError(
            f"--out {args.out}: exists and is not a directory", hint="give a directory path"
        )
    world = generate_world(
        args.seed, args.num_entities, test_fraction=args.test_fraction, answers=args.answers
    )
    paths = write_world(world, args.out)
    if not args.no_tokenizer:
        tokenizer = build_word_tokenizer(world, os.path.join(args.out, "tokenizer"))
        paths["tokenizer"] = os.path.join(args.out, "tokenizer")
        print(f"word tokenizer: {len(tokenizer)} tokens")
    print(
        f"{len(world.corpus)} documents, {len(world.train)} train and {len(world.test)} test questions"
    )
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


if __name__ == "__main__":
    run_cli(main)
