"""Tests for dgpo_jax.models.tokenizer.

Independent references: tiktoken (a separate BPE implementation) built from the same
`qwen.tiktoken` ranks and the Qwen2 split regex, published Qwen2.5 ids, and hand-derived cases.
The Qwen2.5 build runs once per test session into a temporary cache directory.
"""

from __future__ import annotations

import base64
import json
import os
import random
import unicodedata
from pathlib import Path

import pytest

tiktoken = pytest.importorskip("tiktoken")

from dgpo_jax.models import tokenizer as tokenizer_module  # noqa: E402
from dgpo_jax.models.tokenizer import load_tokenizer, read_bpe_ranks, recover_merges  # noqa: E402

# Written out here (not imported) so the reference does not share the module's constant.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5 added tokens and their published ids (tokenizer_config.json of Qwen2.5).
EXPECTED_ADDED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
NOT_SPECIAL = {
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
}

CORPUS = [
    "Hello world",
    "Hello, world!",
    "",
    " ",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine; we've seen THEY'RE and You'D too.",
    "<search> who wrote hamlet </search>",
    '<information>Doc 1 (Title: "Hamlet") Hamlet is a tragedy by William Shakespeare.</information>',
    "<think>The user asks who wrote Hamlet.</think>\n<answer> William Shakespeare </answer>",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", a[i]); }',
    "1234567890 3.14159 -42 1e-6 0x1F 2024-11-21 12:34:56",
    "$1,000,000.00 and 99.9% of 1/3",
    "    leading spaces",
    "trailing spaces    ",
    "multiple     internal      spaces",
    "tabs\t\tand\tmixed \t whitespace",
    "line1\nline2\r\nline3\rline4\n\n\n",
    "\n\n  \n \t\n",
    "   \n   indented after newline",
    "中文分词测试：今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장입니다.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "Café naïve résumé façade Ærøskøbing Straße",
    "Ελληνικά και русский язык и العربية",
    "मानक हिन्दी",
    "Mixed 中文 and English 123 with émoji 🚀!",
    "URLs https://example.com/path?q=1&r=two#frag and emails a.b@c.org",
    'JSON {"key": [1, 2, {"nested": null}], "b": true}',
    "!!!???...---___===+++***",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
    "a\u00a0non-breaking\u2003em-space\u200bzero-width",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    '<tool_call>\n{"name": "search"}\n</tool_call>',
]


def _tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    return ranks


@pytest.fixture(scope="session")
def ranks_path() -> Path:
    return tokenizer_module.qwen_ranks_path()


@pytest.fixture(scope="session")
def reference_encoding(ranks_path):
    """tiktoken Encoding over the same ranks: an independent BPE implementation."""
    return tiktoken.Encoding(
        name="qwen2_reference",
        pat_str=QWEN2_REGEX,
        mergeable_ranks=_tiktoken_ranks(ranks_path),
        special_tokens=EXPECTED_ADDED_IDS,
    )


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dgpo_jax_cache")


@pytest.fixture(scope="session")
def qwen_tokenizer(cache_root):
    """Builds the Qwen2.5 tokenizer once per session, in a private cache dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DGPO_JAX_CACHE", str(cache_root))
        return load_tokenizer("qwen2.5")


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------
# Identity with published values and with tiktoken
# ------------------------------------------------------------------------------------------


def test_published_ids(qwen_tokenizer):
    assert _encode(qwen_tokenizer, "Hello world") == [9707, 1879]
    assert _encode(qwen_tokenizer, "Hello, world!") == [9707, 11, 1879, 0]
    assert len(qwen_tokenizer) == 151665


def test_added_tokens_ids_flags_and_config(qwen_tokenizer):
    for content, expected_id in EXPECTED_ADDED_IDS.items():
        assert qwen_tokenizer.convert_tokens_to_ids(content) == expected_id
        assert _encode(qwen_tokenizer, content) == [expected_id], content
    decoder = qwen_tokenizer.added_tokens_decoder
    assert {token.content: token.special for token in decoder.values()} == {
        content: content not in NOT_SPECIAL for content in EXPECTED_ADDED_IDS
    }
    assert qwen_tokenizer.eos_token == "<|im_end|>" and qwen_tokenizer.eos_token_id == 151645
    assert qwen_tokenizer.pad_token == "<|endoftext|>" and qwen_tokenizer.pad_token_id == 151643
    assert qwen_tokenizer.bos_token is None
    assert qwen_tokenizer.model_max_length == 131072
    # No BOS/EOS is added around a plain encode.
    assert qwen_tokenizer("Hello world")["input_ids"] == [9707, 1879]
    # Non-special added tokens survive skip_special_tokens, like Qwen2.5's tool-call tags.
    ids = _encode(qwen_tokenizer, "<|im_start|><tool_call>x</tool_call><|im_end|>")
    assert qwen_tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"


def test_corpus_matches_tiktoken(qwen_tokenizer, reference_encoding):
    for text in CORPUS:
        expected = reference_encoding.encode(
            unicodedata.normalize("NFC", text), allowed_special="all"
        )
        assert _encode(qwen_tokenizer, text) == expected, text


def test_random_strings_match_tiktoken(qwen_tokenizer, reference_encoding):
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r  \n\n",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
        "àéîõüçñßøåÆŒ",
        "😀🎉👍🚀🔥🇫🇷‍",
        "αβγδεжзийкل م ن",
    ]
    rng = random.Random(1234)
    texts = []
    for _ in range(400):
        pieces = []
        for _ in range(rng.randint(1, 12)):
            pool = rng.choice(pools)
            pieces.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 8))))
        texts.append("".join(pieces))
    texts = [unicodedata.normalize("NFC", text) for text in texts]
    ours = qwen_tokenizer(texts, add_special_tokens=False)["input_ids"]
    reference = reference_encoding.encode_ordinary_batch(texts)
    mismatches = [text for text, a, b in zip(texts, ours, reference) if a != b]
    assert not mismatches, mismatches[:5]


def test_every_vocab_entry_matches_rank_bytes(qwen_tokenizer, reference_encoding):
    # GPT-2 byte alphabet, written independently of the module: printable Latin-1 maps to
    # itself, the remaining bytes map in order to U+0100, U+0101, ...
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    char_to_byte = {chr(b): b for b in keep}
    for offset, b in enumerate(b for b in range(256) if b not in keep):
        char_to_byte[chr(256 + offset)] = b
    assert (
        char_to_byte["Ġ"] == ord(" ") and char_to_byte["Ċ"] == ord("\n") and char_to_byte["Ā"] == 0
    )
    backend = qwen_tokenizer.backend_tokenizer
    assert backend.get_vocab_size(with_added_tokens=False) == 151643
    for token_id in range(151643):
        symbols = backend.id_to_token(token_id)
        assert bytes(
            char_to_byte[c] for c in symbols
        ) == reference_encoding.decode_single_token_bytes(token_id)


def test_every_vocab_entry_encodes_like_tiktoken(qwen_tokenizer, reference_encoding):
    """Each vocabulary entry that is valid NFC text, run through both full pipelines."""
    texts = []
    for token_id in range(151643):
        raw = reference_encoding.decode_single_token_bytes(token_id)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if unicodedata.normalize("NFC", text) == text:
            texts.append(text)
    assert len(texts) > 140_000
    ours = qwen_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    reference = reference_encoding.encode_ordinary_batch(texts)
    mismatches = [t for t, a, b in zip(texts, ours, reference) if a.ids != b]
    assert not mismatches, mismatches[:5]


def test_nfc_normalisation(qwen_tokenizer, reference_encoding):
    decomposed = "Cafe\u0301 nai\u0308ve"  # e + combining acute, i + combining diaeresis
    composed = unicodedata.normalize("NFC", decomposed)
    assert composed != decomposed
    assert _encode(qwen_tokenizer, decomposed) == reference_encoding.encode_ordinary(composed)
    # tiktoken alone does not normalise, so its ids for the decomposed text differ.
    assert reference_encoding.encode_ordinary(decomposed) != reference_encoding.encode_ordinary(
        composed
    )


def test_decode_round_trip(qwen_tokenizer):
    for text in CORPUS:
        nfc = unicodedata.normalize("NFC", text)
        assert qwen_tokenizer.decode(_encode(qwen_tokenizer, text)) == nfc, text


# ------------------------------------------------------------------------------------------
# Merges
# ------------------------------------------------------------------------------------------


def test_merges_count_in_built_tokenizer(qwen_tokenizer, tmp_path):
    qwen_tokenizer.save_pretrained(str(tmp_path))
    model = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert model["type"] == "BPE"
    assert len(model["merges"]) == 151_387
    assert len(model["vocab"]) == 151_643


def test_recover_merges_hand_derived():
    # "abc": the pair ranks are ab=3 < bc=4, so BPE merges ab first; abc = (ab, c).
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert recover_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c")]
    # Swapped ranks: bc=3 < ab=4, so abc = (a, bc).
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5}
    assert recover_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]
    # Equal pair ranks resolve leftmost: "aaa" -> (aa, a).
    assert recover_merges({b"a": 0, b"aa": 1, b"aaa": 2}) == [(b"a", b"a"), (b"aa", b"a")]
    # Lower ranks only: "abc" cannot use ab (rank 6 > 5) so it splits as (a, bc).
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"abc": 5, b"ab": 6}
    assert recover_merges(ranks)[1] == (b"a", b"bc")


def test_recover_merges_rejects_unreachable_token():
    with pytest.raises(ValueError, match="not reachable"):
        recover_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


# ------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------


def test_chat_template_default_system_and_generation_prompt(qwen_tokenizer, reference_encoding):
    messages = [{"role": "user", "content": "Who wrote Hamlet?"}]
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWho wrote Hamlet?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == expected
    ids = qwen_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert ids == reference_encoding.encode(expected, allowed_special="all")
    assert ids[0] == 151644 and ids.count(151645) == 2
    assert qwen_tokenizer.decode(ids) == expected
    no_prompt = qwen_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False
    )
    assert no_prompt == expected[: -len("<|im_start|>assistant\n")]


def test_chat_template_system_and_multi_turn(qwen_tokenizer):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
    )
    assert qwen_tokenizer.apply_chat_template(messages, tokenize=False) == expected


def test_chat_template_tools_branch(qwen_tokenizer):
    tool = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": "Q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "search", "arguments": {"query": "x"}}}
            ],
        },
        {"role": "tool", "content": "R1"},
        {"role": "tool", "content": "R2"},
    ]
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(tool)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nQ<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "search", "arguments": {"query": "x"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nR1\n</tool_response>\n<tool_response>\nR2\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text = qwen_tokenizer.apply_chat_template(
        messages, tools=[tool], tokenize=False, add_generation_prompt=True
    )
    assert text == expected


# ------------------------------------------------------------------------------------------
# Local directories, cache, errors
# ------------------------------------------------------------------------------------------


def test_load_from_saved_directory_gives_identical_ids(qwen_tokenizer, tmp_path):
    qwen_tokenizer.save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(tmp_path)
    assert len(reloaded) == 151665
    for text in CORPUS:
        assert _encode(reloaded, text) == _encode(qwen_tokenizer, text), text
    messages = [{"role": "user", "content": "hi"}]
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        qwen_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert reloaded.eos_token_id == 151645 and reloaded.pad_token_id == 151643


def test_load_checkpoint_style_directory(qwen_tokenizer, tmp_path):
    """A directory laid out like a published Qwen2.5 checkpoint (transformers-4 tokenizer_config
    with tokenizer_class Qwen2Tokenizer, inline chat_template, added_tokens_decoder)."""
    qwen_tokenizer.save_pretrained(str(tmp_path / "saved"))
    checkpoint = tmp_path / "Qwen2.5-0.5B-Instruct"
    checkpoint.mkdir()
    (checkpoint / "tokenizer.json").write_bytes(
        (tmp_path / "saved" / "tokenizer.json").read_bytes()
    )
    template = (tmp_path / "saved" / "chat_template.jinja").read_text(encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": content not in NOT_SPECIAL,
            }
            for content, token_id in EXPECTED_ADDED_IDS.items()
        },
        "additional_special_tokens": [c for c in EXPECTED_ADDED_IDS if c not in NOT_SPECIAL][1:],
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen2"}), encoding="utf-8")
    loaded = load_tokenizer(str(checkpoint))
    for text in CORPUS:
        assert _encode(loaded, text) == _encode(qwen_tokenizer, text), text
    assert loaded.eos_token_id == 151645 and loaded.pad_token_id == 151643
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_cache_is_reused_and_complete(qwen_tokenizer, cache_root, monkeypatch):
    entries = list((cache_root / "tokenizers").iterdir())
    assert len(entries) == 1, entries  # no leftover temporary directories
    cached = entries[0]
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "dgpo_jax_build.json",
    } <= {p.name for p in cached.iterdir()}

    def fail_build(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setenv("DGPO_JAX_CACHE", str(cache_root))
    monkeypatch.setattr(tokenizer_module, "build_qwen25_tokenizer", fail_build)
    again = load_tokenizer("qwen2.5")
    assert _encode(again, "Hello world") == [9707, 1879]


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    class HalfWritingTokenizer:
        def save_pretrained(self, directory):
            Path(directory, "tokenizer.json").write_text("{")  # partial file, then a crash
            raise KeyboardInterrupt

    monkeypatch.setenv("DGPO_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(
        tokenizer_module, "build_qwen25_tokenizer", lambda *a, **k: HalfWritingTokenizer()
    )
    with pytest.raises(KeyboardInterrupt):
        load_tokenizer("qwen2.5")
    assert list((tmp_path / "tokenizers").iterdir()) == []


def test_error_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_tokenizer(missing)
    assert str(missing) in str(info.value) and "qwen2.5" in str(info.value)


def test_error_directory_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as info:
        load_tokenizer(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "config.json" in message


def test_error_file_instead_of_directory(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_tokenizer(path)


def test_error_unknown_names():
    with pytest.raises(ValueError, match="Unknown tokenizer name 'llama3'") as info:
        load_tokenizer("llama3")
    assert "qwen2.5" in str(info.value) and "directory" in str(info.value)
    with pytest.raises(FileNotFoundError) as info:  # hub ids are not downloaded
        load_tokenizer("Qwen/Qwen2.5-0.5B")
    assert "qwen2.5" in str(info.value) and "not downloaded" in str(info.value)


def test_error_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ValueError, match="Could not load the tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    "lines, message",
    [
        (["IQ== 0", "not-base64! 1"], r":2: cannot parse"),
        (["IQ== 0", "Ig== 0"], r":2: rank 0 is negative or repeated"),
        (["IQ== 0", "IQ== 1"], r":2: token b'!' already has rank 0"),
        (["IQ== 0", "Ig== 2"], r"not contiguous"),
        (["IQ== 0", "Ig=="], r":2: expected '<base64 token> <rank>'"),
        (["IQ== 0", "Ig== 1"], r"single-byte tokens missing"),
    ],
)
def test_read_bpe_ranks_errors(tmp_path, lines, message):
    path = tmp_path / "bad.tiktoken"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        read_bpe_ranks(path)


def test_read_bpe_ranks_qwen_file(ranks_path):
    ranks = read_bpe_ranks(ranks_path)
    assert len(ranks) == 151643
    assert ranks[b"Hello"] == 9707 and ranks[b" world"] == 1879
    assert os.path.basename(ranks_path) == "qwen.tiktoken"


def test_known_name_wins_over_same_named_directory(
    qwen_tokenizer, cache_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("DGPO_JAX_CACHE", str(cache_root))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qwen2.5").mkdir()
    assert _encode(load_tokenizer("qwen2.5"), "Hello world") == [9707, 1879]
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer("./qwen2.5")
