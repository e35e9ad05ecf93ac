"""Search-R1 parquet reading/validation and the resumable grain pipeline."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dgpo_jax.data.pipeline import PromptBatches
from dgpo_jax.data.search_r1 import (
    DEFAULT_TEMPLATE,
    DataError,
    format_question,
    read_search_r1_parquet,
)


def _row(i, q="who wrote hamlet", golds=("Shakespeare",)):
    return {
        "data_source": "nq",
        "prompt": [{"role": "user", "content": format_question(q)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": list(golds)}},
        "extra_info": {"split": "train", "index": i},
    }


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_format_question_matches_reference_text():
    text = format_question("  who wrote hamlet ")
    assert text.endswith("Question: who wrote hamlet?\n")
    assert "as many times as your want" in text  # the reference typo is kept
    assert format_question("why?") == DEFAULT_TEMPLATE.format(question="why?")


def test_read_valid_file(tmp_path):
    path = _write(tmp_path / "a.parquet", [_row(0), _row(1, "capital of france", ("Paris",))])
    recs = read_search_r1_parquet(path)
    assert [r.golds for r in recs] == [("Shakespeare",), ("Paris",)]
    assert recs[1].user_content.endswith("capital of france?\n")
    assert recs[1].index == 1 and recs[1].split == "train" and recs[0].data_source == "nq"


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda r: r.update(data_source=""), "data_source"),
        (lambda r: r.update(prompt=[]), "prompt"),
        (lambda r: r["prompt"][0].update(content=" "), r"prompt\[0\].content"),
        (
            lambda r: r["reward_model"]["ground_truth"].update(target=[]),
            "reward_model.ground_truth.target",
        ),
    ],
)
def test_malformed_row_names_file_row_and_field(tmp_path, mutate, field):
    rows = [_row(0), _row(1), _row(2)]
    mutate(rows[2])
    path = _write(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=rf"bad.parquet: row 2: field '{field}'"):
        read_search_r1_parquet(path)


def test_missing_column_and_bad_files(tmp_path):
    path = _write(tmp_path / "nocol.parquet", [{"data_source": "nq", "prompt": "x"}])
    with pytest.raises(DataError, match=r"missing columns \['reward_model'\]"):
        read_search_r1_parquet(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_search_r1_parquet(tmp_path / "junk.parquet")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_search_r1_parquet(tmp_path / "none.parquet")


def test_batches_deterministic_epochs_cover_everything():
    recs = list(range(10))
    a = PromptBatches(recs, batch_size=5, seed=7)
    b = PromptBatches(recs, batch_size=5, seed=7)
    first = [next(a) for _ in range(4)]
    assert first == [next(b) for _ in range(4)]
    assert sorted(first[0] + first[1]) == recs and sorted(first[2] + first[3]) == recs
    assert first[:2] != first[2:]  # a fresh permutation each epoch
    assert [next(PromptBatches(recs, 5, seed=8)) for _ in range(1)] != first[:1]


def test_state_resume_gives_same_order():
    recs = list(range(23))
    run = PromptBatches(recs, batch_size=4, seed=1)
    for _ in range(3):
        next(run)
    state = json.loads(json.dumps(run.state()))  # goes through checkpoint JSON metadata
    expected = [next(run) for _ in range(6)]
    resumed = PromptBatches(recs, batch_size=4, seed=1)
    resumed.restore(state)
    assert [next(resumed) for _ in range(6)] == expected


def test_process_shards_partition_global_batch():
    recs = list(range(16))
    shards = [
        PromptBatches(recs, batch_size=2, seed=0, process_index=p, process_count=4)
        for p in range(4)
    ]
    batch = [x for s in shards for x in next(s)]
    assert sorted(batch) == sorted(set(batch)) and len(batch) == 8
