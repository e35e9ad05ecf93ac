"""The notebooks run end to end (nbclient, a kernel on this interpreter, one CPU device) with
tiny settings in place of their parameters cell, and what they show is checked against
independent computations: the exported model's logits against the DGPO checkpoint through
dgpo_jax.forward, the agent's displayed searches and information against the retriever."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests

from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.data.synthetic import build_word_tokenizer, generate_world, write_world
from dgpo_jax.evaluation import exact_match
from dgpo_jax.launch.metrics_log import read_metrics
from dgpo_jax.models import Qwen2Config, forward, get_preset, save_hf
from dgpo_jax.models.tokenizer import load_tokenizer
from dgpo_jax.retrieval import InProcessRetriever, information_observation, parse_action
from retrieval_service.index import build_index
from tests.conftest import random_params

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
KERNEL_NAME = "dgpo-jax-test"
# Printed by the cell the test appends: the notebook's own variables, as JSON on one line.
PROBE_MARK = "NOTEBOOK-PROBE "


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel spec for this interpreter (the venv's), with one CPU device (compiles faster
    than conftest's 8), offline."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    env = {
        "JAX_PLATFORMS": "cpu",
        # One device and cheaper CPU compiles: the notebooks are compile-bound at these sizes.
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": ROOT,
    }
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dgpo_jax tests",
        "language": "python",
        "env": env,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(root))
        mp.delenv("MPLBACKEND", raising=False)
        yield KERNEL_NAME


def execute(name, overrides, probe, kernel_name, timeout=600):
    """Runs notebooks/NAME with ``overrides`` appended to its parameters cell and ``probe``
    appended as a last cell; returns (executed notebook, the probe's JSON)."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        f"{name} is committed with outputs"
    )
    tagged[0].source += "\n\n# --- test settings\n" + overrides
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import json as _json, sys as _sys\n"
            f"print({PROBE_MARK!r} + _json.dumps([_sys.executable, {probe}]))"
        )
    )
    client = nbclient.NotebookClient(
        nb, kernel_name=kernel_name, timeout=timeout, resources={"metadata": {"path": NOTEBOOKS}}
    )
    client.execute()
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    line = next(x for x in text.splitlines() if x.startswith(PROBE_MARK))
    python, probed = json.loads(line[len(PROBE_MARK) :])
    assert python == sys.executable, f"the kernel ran {python}, not {sys.executable}"
    return nb, probed


def stream_text(nb, cell_id):
    cell = next(c for c in nb.cells if c.get("id") == cell_id)
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


# ------------------------------------------------------------------------------ quickstart ---
def test_quickstart_notebook(kernel, tmp_path):
    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
    import transformers  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    workdir = tmp_path / "run"
    rl_steps, teacher_steps = 2, 60
    # The packaged quickstart config with the scanned decode path, which compiles ~3x faster
    # than "auto"'s CPU path (the CPU path is test_sampler_waves' and test_sampler's subject).
    config_file = tmp_path / "quickstart_test_config.py"
    config_file.write_text(
        "from dgpo_jax.configs.quickstart import get_config as quickstart_config\n\n\n"
        "def get_config():\n"
        "    cfg = quickstart_config()\n"
        "    cfg.sampler.decode_path = 'accelerator'\n"
        "    return cfg\n"
    )
    # The teacher memorises 4 training questions, and the cold start asks it those same 4:
    # it answers them, so the cold start has trajectories to distill at this tiny size.
    overrides = (
        f"WORKDIR = {str(workdir)!r}\nCONFIG = {str(config_file)!r}\n"
        "NUM_ENTITIES = 100\nTEACHER_QUESTIONS = 4\n"
        f"TEACHER_STEPS = {teacher_steps}\nTEACHER_BATCH_SIZE = 4\nTEACHER_LR = 3e-3\n"
        "COLDSTART_QUESTIONS = 4\nCOLDSTART_EPOCHS = 1\nCOLDSTART_BATCH_SIZE = 4\n"
        f"RL_STEPS = {rl_steps}\nRL_BATCH_SIZE = 4\nEVAL_EXAMPLES = 4\n"
        "EVAL_BATCH_SIZE = 8\nMICRO_BATCH_SIZE = 4\nSHOW_PROGRESS = False\n"
    )
    probe = (
        '{"hf_dir": hf_dir, "num_sequences": coldstart["num_sequences"], '
        '"em_table": em_table, "dgpo_workdir": dgpo_cfg.workdir, "prompt": prompt, '
        '"prompt_ids": ids[0].tolist()}'
    )
    nb, out = execute("quickstart_colab.ipynb", overrides, probe, kernel)

    # The stages ran through the launcher's code and logged every step.
    assert out["num_sequences"] >= 1
    assert set(out["em_table"]) == {"teacher", "student + KD cold start", "student + KD + DGPO"}
    teacher_log = read_metrics(str(workdir / "teacher_sft" / "teacher_sft_metrics.jsonl"))
    assert teacher_log[-1]["step"] == teacher_steps
    assert teacher_log[-1]["loss"] < 0.5 * teacher_log[0]["loss"]
    dgpo_log = read_metrics(os.path.join(out["dgpo_workdir"], "metrics.jsonl"))
    assert [r["step"] for r in dgpo_log] == list(range(1, rl_steps + 1))
    for record in dgpo_log:
        for key in ("reward", "kl_k1", "loss"):
            assert np.isfinite(record[key]), (key, record)

    # The curves cell displayed a figure.
    curves = next(c for c in nb.cells if c.get("id") == "curves")
    assert any("image/png" in o.get("data", {}) for o in curves.outputs)
    assert "EM on held-out entities" in stream_text(nb, "curves")

    # The export loads in transformers, with the logits of the last DGPO checkpoint.
    hf_dir = out["hf_dir"]
    assert os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
    ckpt = Checkpointer(os.path.join(out["dgpo_workdir"], "checkpoints"))
    assert ckpt.latest_step() == rl_steps
    state, meta = ckpt.restore(rl_steps)
    ckpt.close()
    config = Qwen2Config.from_hf_dict(meta["model_config"])
    ids = np.random.RandomState(0).randint(0, config.vocab_size, (2, 11))
    ours = np.asarray(forward(config, state["train"]["params"]["policy"], ids))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = model.eval()(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() < 1e-4
    assert "logit difference" in stream_text(nb, "reload")
    # The notebook's transformers tokenizer encodes like the world's word tokenizer.
    word_tokenizer = load_tokenizer(str(workdir / "tokenizer"))
    assert out["prompt_ids"] == word_tokenizer.encode(out["prompt"], add_special_tokens=False)


# ------------------------------------------------------------------------------ agent demo ---
def scripted_agent(config, tokenizer, first_names, last_names, answer_tokens):
    """Untied tiny-Qwen2 weights whose next token depends only on the current one: a newline
    opens <search> (2/3) or <answer> (1/3); <search> is followed by one of the
    (first_names[j], last_names[j]) pairs and </search>; <answer> by ``answer_tokens`` and
    </answer>. Attention and MLP outputs are zero, so the residual stream is the embedding."""

    vocab = tokenizer.get_vocab()
    chain = ["\n", "<search>", "<answer>"] + first_names + last_names + answer_tokens
    assert len(set(chain)) == len(chain), "the scripted tokens must be distinct"
    params = jax.tree.map(np.array, random_params(config, seed=0))
    params["layers"]["attn"]["o_kernel"][:] = 0.0
    params["layers"]["mlp"]["down_kernel"][:] = 0.0
    d = config.hidden_size
    embed = np.zeros((config.vocab_size, d), np.float32)
    for k, token in enumerate(chain):
        embed[vocab[token], k] = 1.0  # RMS norm turns this into sqrt(d) in dimension k
    head = np.zeros((d, config.vocab_size), np.float32)

    def follow(current, following, logit):
        head[chain.index(current), vocab[following]] = logit / np.sqrt(d)

    follow("\n", "<search>", 10.0)
    follow("\n", "<answer>", 9.3)
    for first, last in zip(first_names, last_names):
        follow("<search>", first, 10.0)
        follow(first, last, 12.0)
        follow(last, "</search>", 12.0)
    for current, following in zip(["<answer>"] + answer_tokens, answer_tokens + ["</answer>"]):
        follow(current, following, 12.0)
    params["embed_tokens"], params["lm_head"] = embed, head
    params["final_norm"][:] = 1.0
    return jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def agent_setup(tmp_path_factory):
    """A synthetic world's BM25 index, and a HF directory (model + word tokenizer)."""

    d = tmp_path_factory.mktemp("agent")
    world = generate_world(seed=0, num_entities=40)
    paths = write_world(world, d / "world")
    tokenizer = build_word_tokenizer(world)
    build_index(paths["corpus.jsonl"], d / "index", "bm25", show_progress=False)
    encode = lambda text: tokenizer.tokenize(text)
    answer = encode(world.test[0]["golden_answers"][0])
    names, used = [], set(answer)
    for entity in world.entities:  # three people whose name words are all distinct
        words = encode(entity.name)
        if entity.kind == "person" and len(words) == 2 and not used & set(words):
            names.append(words)
            used.update(words)
    names = names[:3]
    config = get_preset("tiny", vocab_size=len(tokenizer)).replace(tie_word_embeddings=False)
    params = scripted_agent(config, tokenizer, [n[0] for n in names], [n[1] for n in names], answer)
    save_hf(config, params, str(d / "hf"), tokenizer=tokenizer)
    return {
        "hf": str(d / "hf"),
        "index": str(d / "index"),
        "test_file": paths["test.parquet"],
        "rows": world.test[:6],
        "tokenizer": tokenizer,
    }


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def retrieval_server(agent_setup, tmp_path):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "retrieval_service.serve",
            "--index",
            agent_setup["index"],
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def wait_ready(url, proc, timeout_s=120):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, f"retrieval server exited with {proc.returncode}"
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"retrieval server at {url} not ready in {timeout_s} s")


AGENT_SETTINGS = dict(
    GREEDY=False,
    TEMPERATURE=1.0,
    SEED=3,
    MAX_TURNS=2,
    MAX_NEW_TOKENS_PER_TURN=8,
    MAX_NEW_TOKENS=32,
    MAX_OBS_LENGTH=48,
    MAX_PROMPT_LENGTH=160,
    CACHE_LEN=320,
)


# One document per search fits in MAX_OBS_LENGTH, two are cut off (the model reads the start);
# questions from a Search-R1 parquet file (with gold answers) or a list of plain questions.
@pytest.mark.parametrize("retrieval,topk,source", [("in_process", 1, "file"), ("http", 2, "list")])
def test_search_agent_notebook(kernel, agent_setup, retrieval, topk, source, request):
    rows = agent_setup["rows"]
    settings = dict(AGENT_SETTINGS, TOPK=topk, HF_DIR=agent_setup["hf"])
    if source == "file":
        settings.update(
            QUESTIONS=[], QUESTIONS_FILE=agent_setup["test_file"], NUM_FILE_QUESTIONS=len(rows)
        )
    else:
        settings.update(QUESTIONS=[row["question"] for row in rows], QUESTIONS_FILE="/nonexistent")
    if retrieval == "http":
        url, proc = request.getfixturevalue("retrieval_server")
        wait_ready(url, proc)
        settings.update(RETRIEVAL_URL=url, INDEX_DIR="/nonexistent")
    else:
        settings.update(INDEX_DIR=agent_setup["index"], RETRIEVAL_URL="")
    overrides = "".join(f"{k} = {v!r}\n" for k, v in settings.items())
    probe = (
        '{"transcripts": transcripts, "queries": rollout.queries, '
        '"turn_texts": rollout.turn_texts, "answers": rollout.answers, '
        '"finish": rollout.finish_reasons, '
        '"num_turns": rollout.arrays.num_turns.tolist(), '
        '"num_searches": rollout.arrays.num_searches.tolist()}'
    )
    nb, out = execute("search_agent_demo.ipynb", overrides, probe, kernel)

    tok = agent_setup["tokenizer"]
    reference = InProcessRetriever(agent_setup["index"], topk=settings["TOPK"])
    shown = stream_text(nb, "transcripts")
    transcripts = out["transcripts"]
    assert len(transcripts) == len(rows)
    for row, (question_row, entry) in enumerate(zip(rows, transcripts)):
        assert f"Question {row + 1}: {question_row['question']}" in shown
        if source == "file":  # the row's own prompt, and EM against its gold answers
            assert entry["prompt"] == question_row["prompt"][0]["content"]
            assert entry["golds"] == list(question_row["golden_answers"])
            assert entry["em"] == exact_match(entry["answer"], entry["golds"])
        else:
            assert entry["golds"] == [] and entry["em"] is None
        turns = entry["turns"]
        assert len(turns) == out["num_turns"][row]
        # The turns the host parsed are the turns shown (a turn cut by a budget has no host text).
        assert [t["text"] for t in turns[: len(out["turn_texts"][row])]] == out["turn_texts"][row]
        searched = [t for t in turns if t["query"] is not None]
        assert [t["query"] for t in searched] == out["queries"][row]
        assert len(searched) == out["num_searches"][row] == entry["searches"]
        for turn in searched:
            # The query is the turn's search action, and the information shown is what the
            # retriever returns for it, as the model read it (cut to MAX_OBS_LENGTH tokens).
            assert parse_action(turn["text"]) == ("search", turn["query"])
            text = information_observation(reference.search([turn["query"]])[0])
            ids = tok.encode(text, add_special_tokens=False)[: settings["MAX_OBS_LENGTH"]]
            assert turn["information"] == tok.decode(ids, skip_special_tokens=False)
            assert f"searched: {turn['query']!r}" in shown
        assert entry["answer"] == out["answers"][row]
        assert entry["finish_reason"] == out["finish"][row]
        if entry["finish_reason"] == "answer":
            assert parse_action(turns[-1]["text"]) == ("answer", entry["answer"])
        assert f"finish reason: {entry['finish_reason']}" in shown
    # The scripted model both searches and answers across these questions.
    assert sum(out["num_searches"]) >= 2
    assert "answer" in out["finish"]
