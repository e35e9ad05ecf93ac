"""Result files are replaced whole or not at all."""

import os

import pytest

from dgpo_jax.checkpoint.fileio import write_atomically, write_text_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    path = str(tmp_path / "results.json")
    write_text_atomically(path, "old")

    def fails_halfway(partial):
        with open(partial, "w") as handle:
            handle.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, fails_halfway)
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["results.json"]
    write_text_atomically(path, "new ✓")
    assert open(path, encoding="utf-8").read() == "new ✓"
    assert os.listdir(tmp_path) == ["results.json"]
