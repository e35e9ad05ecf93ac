"""`SamplerConfig`: every static setting of a rollout, and the finish reasons it can report.

The config is a frozen (hashable) dataclass so the jitted rollout program takes it as a static
argument: changing any field compiles a new program, the same config reuses the compiled one.
Stop sequences are token-id tuples (build them from a tokenizer with `stop_sequences_for`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Finish reasons: the int codes the compiled program writes, and their names.
RUNNING = 0
ANSWER = 1  # a turn held a well-formed <answer>...</answer> action
EOS = 2  # a turn ended on EOS with no action and `eos_ends_trajectory` is set
MAX_TURNS = 3  # the final (search-disabled) turn ended without an answer
MAX_TOKENS = 4  # the per-trajectory budget of generated tokens ran out
CONTEXT_FULL = 5  # the KV cache (context length) could not hold the next token/observation
RETRIEVER_ERROR = 6  # the retriever raised for the call this row's search was part of
PROMPT_TOO_LONG = 7  # the prompt is longer than `max_prompt_length`; nothing was generated
FINISH_REASONS = (
    "running",
    "answer",
    "eos",
    "max_turns",
    "max_tokens",
    "context_full",
    "retriever_error",
    "prompt_too_long",
)

# Row phases inside the compiled loop (AWAITING_HOST: the turn ended, its action is pending).
GENERATING, INGESTING, DONE, AWAITING_HOST = 0, 1, 2, 3

# Actions the host reports for a finished turn.
ACTION_INVALID, ACTION_SEARCH, ACTION_ANSWER, ACTION_ERROR = 0, 1, 2, 3

# Choices of the execution settings (one list, also read by the run config's validation).
DECODE_PATHS = ("auto", "cpu", "accelerator")
DECODE_LAYERS = ("auto", "scan", "split")
DECODE_ATTENTION = ("xla", "pallas", "fused")
CHUNK_ATTENTION = ("auto", "xla", "pallas")
HOST_CALLS = ("auto", "single", "per_shard")
ON_RETRIEVER_ERROR = ("raise", "finish")  # `Sampler(on_retriever_error=)`, retrieval.on_error

TokenSeqs = tuple[tuple[int, ...], ...]


def _as_token_seqs(name: str, value: Any) -> TokenSeqs:
    seqs = tuple(tuple(int(t) for t in seq) for seq in value)
    for seq in seqs:
        if not seq:
            raise ValueError(f"SamplerConfig.{name}: empty stop sequence in {value!r}")
        if any(t < 0 for t in seq):
            raise ValueError(f"SamplerConfig.{name}: negative token id in {seq!r}")
    return tuple(dict.fromkeys(seqs))  # dedupe, keep order


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static settings of a multi-turn search rollout (see docs/sampler.md).

    Lengths are in tokens. The context is `cache_len` KV slots per row: the left-padded prompt
    (its padded width) plus everything after it (generated turns, observations, prefixes).
    """

    # --- lengths -----------------------------------------------------------------------------
    cache_len: int = 4096  # KV slots per row = context length limit (finish reason context_full)
    max_prompt_length: int = 2048  # longer prompts finish with prompt_too_long (never truncated)
    max_new_tokens_per_turn: int = 500  # a turn that reaches it ends; its action is parsed as usual
    max_new_tokens: int = 2048  # generated tokens per trajectory (finish reason max_tokens)
    max_obs_length: int = 500  # observation tokens kept (the rest of an observation is cut off)
    max_prefix_length: int = 0  # width of the teacher-prefix buffer (TrOPD); 0: no prefixes
    # --- protocol ----------------------------------------------------------------------------
    max_turns: int = 4  # search turns; then one final turn with search disabled
    eos_ends_trajectory: bool = False  # EOS with no action: finish "eos" (else invalid notice)
    # --- stop sequences (token ids; matched on the suffix of the turn's generated tokens) -----
    eos_token_ids: tuple[int, ...] = ()
    search_stops: TokenSeqs = ()  # tokenizations of "</search>"
    answer_stops: TokenSeqs = ()  # tokenizations of "</answer>"
    pad_token_id: int = 0  # written in the outputs after a row's end (masked out)
    # --- sampling ----------------------------------------------------------------------------
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    # --- mixed rollouts ----------------------------------------------------------------------
    teacher_turn_prob: float = 0.0  # Guided-OPD: P(the teacher writes a given turn of a row)
    # --- execution (docs/sampler.md) ----------------------------------------------------------
    # Observation tokens per ingest step ([M, C]: every row of a host wave at once).
    ingest_chunk: int = 128
    # Host waves: rows whose turn ended wait (cache kept) while the others decode; the host is
    # called for all of them when this share of the live rows waits (0: at every turn end;
    # 1: only when no row generates), ...
    wave_fraction: float = 0.75
    # ... or when the oldest waiting row has waited this many decode steps (0: no limit).
    wave_max_wait: int = 0
    # "cpu": unrolled layers, rows gathered into sub-batches, a key window per layer;
    # "accelerator": scanned layers, all rows every step with a mask, one window per step;
    # "auto": by the platform of the devices.
    decode_path: str = "auto"
    # "split": the layers' weights split once per rollout, the layers unrolled in each step,
    # a KV cache array per layer; "scan": stacked weights and cache, one scanned layer body;
    # "auto": split on the cpu path and on GPUs, else scan.
    decode_layers: str = "auto"
    # One-token decode attention: "xla" (the masked key window); "pallas": JAX's Pallas GPU
    # decode kernel, reading each row's run of cached slots and nothing past it; "fused": one
    # Triton kernel a layer for the rotary, the cache write and that attention (cache_len a
    # multiple of 16). Both: the accelerator path with split layers; off a GPU interpreted.
    decode_attention: str = "xla"
    # Steps of several tokens for all rows (the prefill; on the accelerator path also the
    # observation and prefix chunks): "xla" (the masked key window, its scores written to
    # memory); "pallas": Pallas kernels attending over the cache in place
    # (`dgpo_jax.models.cache_attention`: two TPU kernels on TPUs, a Triton kernel on GPUs, which
    # needs cache_len a multiple of 16; elsewhere interpreted, for tests; the accelerator path);
    # "auto": pallas on TPUs, else xla (GPUs: until the Triton kernel is timed on one).
    chunk_attention: str = "auto"
    # "single": one host call per wave for the whole batch (on the first device's process);
    # "per_shard": each batch shard calls its own process's host, which searches for its rows
    # against its own retriever; "auto": per_shard when the mesh spans several processes.
    host_calls: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        object.__setattr__(self, "search_stops", _as_token_seqs("search_stops", self.search_stops))
        object.__setattr__(self, "answer_stops", _as_token_seqs("answer_stops", self.answer_stops))
        for name in (
            "cache_len",
            "max_prompt_length",
            "max_new_tokens_per_turn",
            "max_new_tokens",
            "max_obs_length",
            "ingest_chunk",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SamplerConfig.{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.wave_fraction <= 1.0:
            raise ValueError(
                f"SamplerConfig.wave_fraction must be in [0, 1], got {self.wave_fraction}"
            )
        if not isinstance(self.wave_max_wait, int) or self.wave_max_wait < 0:
            raise ValueError(
                f"SamplerConfig.wave_max_wait must be an int >= 0 (0 = no limit), got "
                f"{self.wave_max_wait!r}"
            )
        for name, choices in (
            ("decode_path", DECODE_PATHS),
            ("decode_layers", DECODE_LAYERS),
            ("decode_attention", DECODE_ATTENTION),
            ("chunk_attention", CHUNK_ATTENTION),
            ("host_calls", HOST_CALLS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"SamplerConfig.{name} must be one of {choices}, got {getattr(self, name)!r}"
                )
        if self.decode_attention != "xla" and (
            self.decode_layers == "scan" or self.decode_path == "cpu"
        ):
            raise ValueError(
                f"SamplerConfig.decode_attention={self.decode_attention!r} runs on the "
                f"accelerator path with split layers; got decode_path={self.decode_path!r}, "
                "decode_layers="
                f"{self.decode_layers!r}"
            )
        if self.chunk_attention == "pallas" and self.decode_path == "cpu":
            raise ValueError(
                "SamplerConfig.chunk_attention='pallas' runs on the accelerator path (all rows "
                "every step); got decode_path='cpu'"
            )
        if not isinstance(self.max_turns, int) or self.max_turns < 0:
            raise ValueError(f"SamplerConfig.max_turns must be an int >= 0, got {self.max_turns!r}")
        if self.max_prefix_length < 0:
            raise ValueError(
                f"SamplerConfig.max_prefix_length must be >= 0, got {self.max_prefix_length}"
            )
        if self.max_prompt_length >= self.cache_len:
            raise ValueError(
                f"SamplerConfig.max_prompt_length ({self.max_prompt_length}) must be "
                f"smaller than cache_len ({self.cache_len}): no room left to generate"
            )
        if not self.greedy and not self.temperature > 0:
            raise ValueError(
                f"SamplerConfig.temperature must be > 0 (or set greedy=True), got "
                f"{self.temperature}"
            )
        if self.top_k < 0:
            raise ValueError(f"SamplerConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplerConfig.top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.teacher_turn_prob <= 1.0:
            raise ValueError(
                f"SamplerConfig.teacher_turn_prob must be in [0, 1], got {self.teacher_turn_prob}"
            )
        if not self.search_stops:
            raise ValueError(
                "SamplerConfig.search_stops is empty: the sampler must know how "
                "'</search>' is tokenized (use stop_sequences_for(tokenizer))"
            )

    @property
    def obs_buffer_length(self) -> int:
        """Width of the per-row buffer that holds an observation or a prefix being ingested."""
        return max(self.max_obs_length, self.max_prefix_length)

    @property
    def stop_window(self) -> int:
        """Longest stop sequence (the generated-token suffix kept for matching)."""
        return max(len(s) for s in self.search_stops + self.answer_stops + ((0,),))

    def replace(self, **kw) -> SamplerConfig:
        return dataclasses.replace(self, **kw)

    def compiled(self) -> SamplerConfig:
        """The static part the rollout program compiles for: the settings passed to it traced
        (teacher_turn_prob, wave_fraction, wave_max_wait) at fixed values, so changing them
        reuses the compiled program."""
        return self.replace(teacher_turn_prob=0.0, wave_fraction=0.75, wave_max_wait=0)


def _encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in tokenizer.encode(text, add_special_tokens=False))


def stop_sequences_for(tokenizer, extra_eos: tuple[str, ...] = ("<|im_end|>",)) -> dict:
    """Stop sequences for a tokenizer, as `SamplerConfig` keyword arguments.

    The closing tags are tokenized alone and after a space and before a newline (BPE merges a
    leading space or a trailing newline into the tag's first/last token), so all these
    spellings stop a turn. EOS: the tokenizer's EOS token plus those of `extra_eos` it knows.
    The host still parses the decoded turn text (the protocol's regex), so a spelling missed
    here only makes a turn run on to its token limit; it never changes which action is taken.
    """

    def variants(tag):
        out = []
        for text in (tag, " " + tag, tag + "\n", " " + tag + "\n", tag + "\n\n"):
            ids = _encode(tokenizer, text)
            if text.startswith(" ") and len(ids) > 1 and _encode(tokenizer, " ")[:1] == ids[:1]:
                ids = ids[1:]  # the space is its own token: the tag alone already covers it
            out.append(ids)
        return tuple(dict.fromkeys(out))

    eos = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token in extra_eos:
        if token in vocab:
            eos.append(int(vocab[token]))
    pad = getattr(tokenizer, "pad_token_id", None)
    return {
        "search_stops": variants("</search>"),
        "answer_stops": variants("</answer>"),
        "eos_token_ids": tuple(dict.fromkeys(eos)),
        "pad_token_id": int(pad if pad is not None else (eos[0] if eos else 0)),
    }
