"""The lm-eval model `lingosteer`, run through `lingosteer lm-eval` on local task files.

One lm-eval run (one engine, in a subprocess) scores two tasks over the same items: the
`_sw` task is steered with the planted swh_Latn intervention (language=auto), the `_en`
task runs plain; a third, `steergen_sw`, generates steered. It also scores lm-eval's own
xcopa_sw (steered) and xnli_en (plain; the whole text is the continuation of an empty
context) on the local data files (`evaluation.lmeval_tasks`). A second engine, in this
process, scores the same (context, continuation) pairs with `score_with_vllm` and
generates from the same prompts directly: lm-eval's logged results must equal ours.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from evaluation.lmeval_backend import check_request, check_steerable_context, resolve_language
from evaluation.lmeval_tasks import write_local_tasks
from evaluation.runner import start_scoring_engine
from evaluation.scoring import PLAIN, Condition, Encoded, extra_args, leading_special, score_with_vllm
from lingosteer.backend import shutdown_engine
from lingosteer.data import load_sib200
from plugin_support import write_planted_intervention

N_ITEMS = 8
ALPHA = 1.0  # the planted intervention's manifest default: what language=auto steers with
STEERED = Condition("swh_Latn", ALPHA, "last")
LOCAL_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
doc_to_text: "{{{{premise}}}}"
"""
TASK_YAML = LOCAL_TASK + """\
output_type: multiple_choice
doc_to_choice: "{{{{[choice1, choice2]}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GENERATE_YAML = LOCAL_TASK + """\
output_type: generate_until
doc_to_target: "{{{{choice1}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: {max_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
"""
GENERATE_TOKENS = 8
SCORE_TASKS = ("steercopa_sw", "steercopa_en")
GENERATE_TASK = "steergen_sw"
# lm-eval's own tasks on the local files, their first N_ITEMS items
OWN_TASKS = ("xcopa_sw", "xnli_en")
# how the backend runs each task's requests (language=auto: from the task name; English plain)
CONDITIONS = {"steercopa_sw": STEERED, "steercopa_en": PLAIN, "xcopa_sw": STEERED, "xnli_en": PLAIN}


@pytest.fixture(scope="module")
def interventions(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("interventions")
    write_planted_intervention(root / "swh", model_dir, [0, 1], "swh_Latn", seed=1, strength=3.0,
                               default_alpha=ALPHA)
    return root


def write_tasks(root, items: list[dict]):
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    for name in SCORE_TASKS:
        (root / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data), encoding="utf-8")
    (root / f"{GENERATE_TASK}.yaml").write_text(
        GENERATE_YAML.format(name=GENERATE_TASK, data=data, max_tokens=GENERATE_TOKENS), encoding="utf-8")


def run_lm_eval(tmp_path, model_args: str, tasks: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lingosteer.entrypoints.main", "lm-eval", "--model", "lingosteer",
               "--model_args", model_args, "--include_path", str(tmp_path / "tasks"), "--tasks", tasks,
               "--limit", str(N_ITEMS), "--output_path", str(tmp_path / "out"), "--log_samples"]
    return subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory, model_dir, interventions, data_dir):
    """{task: [(context, continuation, loglikelihood), ...], GENERATE_TASK: [(context, text), ...],
    "acc": {task: accuracy}, "targets": {task: [(doc id, gold option), ...]}}, as lm-eval logged them."""
    tmp_path = tmp_path_factory.mktemp("lm-eval")
    sentences = [row.text for row in load_sib200("swh_Latn", ("dev",), data_dir)[: N_ITEMS + 2]]
    items = [{"premise": sentences[i], "choice1": sentences[i + 1], "choice2": sentences[i + 2], "label": i % 2}
             for i in range(N_ITEMS)]
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks", items)
    write_local_tasks(data_dir, tmp_path / "tasks")
    done = run_lm_eval(tmp_path, f"pretrained={model_dir},interventions={interventions},language=auto,"
                                 f"max_model_len=512,enforce_eager=True", ",".join([*CONDITIONS, GENERATE_TASK]))
    assert done.returncode == 0, done.stderr[-4000:]

    def samples(task):
        [path] = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    logged = {}
    for task in CONDITIONS:
        logged[task] = [(args["arg_0"], args["arg_1"], float(resp[0][0]))  # logged as text
                        for sample in samples(task)
                        for args, resp in zip(sample["arguments"].values(), sample["resps"])]
    assert [len(logged[task]) for task in CONDITIONS] == [2 * N_ITEMS, 2 * N_ITEMS, 2 * N_ITEMS, 3 * N_ITEMS]
    logged["targets"] = {task: [(sample["doc_id"], int(sample["target"])) for sample in samples(task)]
                         for task in OWN_TASKS}
    [results] = (tmp_path / "out").rglob("results_*.json")
    logged["acc"] = {task: json.loads(results.read_text())["results"][task]["acc,none"] for task in OWN_TASKS}
    logged[GENERATE_TASK] = [(sample["arguments"]["gen_args_0"]["arg_0"], sample["resps"][0][0])
                             for sample in samples(GENERATE_TASK)]
    assert len(logged[GENERATE_TASK]) == N_ITEMS
    return logged


@pytest.fixture(scope="module")
def ours(lm_eval_run, model_dir, tokenizer, interventions):
    """The same pairs scored, and the same prompts generated from, by `score_with_vllm` and `LLM.generate`."""
    from vllm import SamplingParams

    special = set(tokenizer.all_special_ids)

    def encode(context, continuation=""):
        # lm-eval's pairing: an empty context is BOS alone (the continuation encoded without it); otherwise
        # the context alone, the whole text, the continuation is the rest.
        if not context:
            return Encoded((tokenizer.bos_token_id, *tokenizer(continuation, add_special_tokens=False)["input_ids"]),
                           1, 1)
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        return Encoded(tuple(whole), len(context_ids), leading_special(context_ids, special))

    requests = [(encode(ctx, cont), condition) for task, condition in CONDITIONS.items()
                for ctx, cont, _ in lm_eval_run[task]]
    prompts = [encode(ctx) for ctx, _ in lm_eval_run[GENERATE_TASK]]
    # lm-eval's greedy generation: "." and EOS stop it, special tokens kept in the text
    sampling = dict(max_tokens=GENERATE_TOKENS, temperature=0.0, stop=[".", tokenizer.eos_token],
                    skip_special_tokens=False, spaces_between_special_tokens=False)
    llm = start_scoring_engine(model_dir, "float32", max_model_len=512, enforce_eager=True,
                               skip_tokenizer_init=False)  # as the backend starts it: it returns text
    try:
        llm.collective_rpc("lingosteer_load", args=(str(interventions / "swh"),))
        scores = score_with_vllm(llm, requests, progress=False).scores
        texts = {condition: [output.outputs[0].text for output in llm.generate(
            [{"prompt_token_ids": list(enc.token_ids)} for enc in prompts],
            [SamplingParams(**sampling, extra_args=extra_args(enc, condition)) for enc in prompts], use_tqdm=False)]
            for condition in (STEERED, PLAIN)}
    finally:
        shutdown_engine(llm)
    return scores, texts


def test_lm_eval_loglikelihoods_equal_ours_plain_and_steered(lm_eval_run, ours):
    scores, _ = ours
    theirs = np.array([ll for task in CONDITIONS for _, _, ll in lm_eval_run[task]])
    np.testing.assert_allclose(theirs, scores, atol=1e-4)
    # the same pairs in both tasks: steering changed them
    assert [row[:2] for row in lm_eval_run[SCORE_TASKS[0]]] == [row[:2] for row in lm_eval_run[SCORE_TASKS[1]]]
    assert np.abs(theirs[: 2 * N_ITEMS] - theirs[2 * N_ITEMS: 4 * N_ITEMS]).max() > 1e-2


def test_lm_eval_own_tasks_on_local_data_score_as_ours(lm_eval_run, ours):
    """lm-eval's xcopa_sw (steered) and xnli_en (plain) on the local files: its accuracy is ours, item by item."""
    scores, _ = ours
    offsets = np.cumsum([0, *(len(lm_eval_run[task]) for task in CONDITIONS)])
    for task in OWN_TASKS:
        start = offsets[list(CONDITIONS).index(task)]
        targets = lm_eval_run["targets"][task]
        per_doc = scores[start: start + len(lm_eval_run[task])].reshape(len(targets), -1)
        assert [doc for doc, _ in targets] == list(range(N_ITEMS))  # the files' first items, in order
        correct = per_doc.argmax(axis=1) == [gold for _, gold in targets]
        assert lm_eval_run["acc"][task] == pytest.approx(correct.mean())


def test_lm_eval_generations_are_steered(lm_eval_run, ours):
    _, texts = ours
    assert [text for _, text in lm_eval_run[GENERATE_TASK]] == texts[STEERED]
    assert texts[STEERED] != texts[PLAIN]


def test_language_from_the_task_name(tmp_path):
    loaded = {"swh_Latn": tmp_path / "swh"}
    assert resolve_language("xcopa_sw", "auto", loaded) == "swh_Latn"
    assert resolve_language("xnli_en", "auto", loaded) is None
    assert resolve_language("xcopa_sw", "none", loaded) is None
    assert resolve_language("xcopa_it", "auto", {}) is None  # no interventions: everything plain
    assert resolve_language("anything", "swh_Latn", loaded) == "swh_Latn"
    missing = r"task 'xcopa_it': no intervention for ita_Latn is loaded \(loaded: swh_Latn\)"
    with pytest.raises(ValueError, match=missing):
        resolve_language("xcopa_it", "auto", loaded)
    with pytest.raises(ValueError, match="task 'arc_easy': .* 'easy' is no language code"):
        resolve_language("arc_easy", "auto", loaded)


def test_broken_items_name_the_task_and_item():
    def request(continuation, doc=None):
        return Instance("loglikelihood", doc=doc or {}, arguments=("Mtu alivunja kioo", continuation), idx=1,
                        metadata=("steercopa_sw", 5, 1))

    assert check_request(request(" kwa sababu")) == "task 'steercopa_sw' item 5"
    with pytest.raises(ValueError, match="task 'steercopa_sw' item 5: empty continuation"):
        check_request(request(" "))  # an empty option after lm-eval's target delimiter
    # a field absent from this item of the JSON file: null in the doc, "None" in the text
    with pytest.raises(ValueError, match="task 'steercopa_sw' item 5: field.s. choice2 missing"):
        check_request(request(" None", doc={"choice1": "kwa sababu", "choice2": None}))


def test_an_empty_context_refuses_positions_placed_relative_to_it():
    """lm-eval's XNLI: the whole text is the continuation of BOS, so "last" / "prompt" would steer BOS / nothing."""
    where = "task 'xnli_sw' item 0"
    empty, full = Encoded((2, 7, 8, 9), 1, 1), Encoded((2, 7, 8, 9), 3, 1)
    for mode in ("last", "prompt"):
        with pytest.raises(ValueError, match=f"{where}: the context holds no token after BOS.*positions=all"):
            check_steerable_context(where, empty, Condition("swh_Latn", 1.0, mode))
        check_steerable_context(where, full, Condition("swh_Latn", 1.0, mode))
    check_steerable_context(where, empty, Condition("swh_Latn", 1.0, "all"))
    check_steerable_context(where, empty, PLAIN)


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory, data_dir):
    """lm-eval's own XCOPA / XNLI tasks on the local files, loaded by lm-eval's TaskManager."""
    from lm_eval.tasks import TaskManager

    out = tmp_path_factory.mktemp("local-tasks")
    names = write_local_tasks(data_dir, out)
    # Only our files are indexed (they include lm-eval's own by path); the index of every task is slower.
    return names, TaskManager(include_path=str(out), include_defaults=False).load(["xcopa_sw", "xnli_sw"])["tasks"]


def test_local_tasks_are_lm_evals_own_on_the_local_files(local_tasks, data_dir):
    from lingosteer.data import load_xcopa

    names, tasks = local_tasks
    assert {"xcopa_sw", "xcopa_zh", "xnli_sw", "xnli_en"} <= set(names)
    assert "xcopa_en" not in names  # the English training file: lm-eval has no such task
    xcopa, xnli = tasks["xcopa_sw"], tasks["xnli_sw"]
    items = load_xcopa(data_dir / "xcopa" / "val.sw.jsonl")
    assert [doc["idx"] for doc in xcopa.eval_docs] == [item.idx for item in items]
    # lm-eval's prompt and metric, unchanged: the premise without its period, then the Swahili connector
    doc = xcopa.eval_docs[0]
    connector = {"cause": "kwa sababu", "effect": "kwa hiyo"}[doc["question"]]
    assert xcopa.doc_to_text(doc) == f"{doc['premise'][:-1]} {connector}"
    assert xcopa.config.metric_list == [{"metric": "acc"}]
    # XNLI's label words (premise<TAB>hypothesis<TAB>word) are lm-eval's labels 0 entailment, 1 neutral,
    # 2 contradiction, and the gold choice carries the word lm-eval's prompt gives that label
    lines = (data_dir / "xnli" / "dev.sw.tsv").read_text(encoding="utf-8").split("\n")[:30]
    words = {"entailment": "Ndiyo", "neutral": "Hivyo", "contradiction": "Hapana"}
    assert len(xnli.eval_docs) > len(lines)
    for doc, line in zip(xnli.eval_docs, lines):
        premise, hypothesis, label = line.split("\t")
        assert (doc["premise"], doc["hypothesis"]) == (premise, hypothesis)
        assert doc["label"] == list(words).index(label)
        assert xnli.doc_to_choice(doc)[xnli.doc_to_target(doc)] == f"{premise}, sahihi? {words[label]}, {hypothesis}"
    assert {line.split("\t")[2] for line in lines} == set(words)  # every label word was seen


def test_local_data_becomes_lm_evals_include_path(tmp_path, data_dir):
    from lingosteer.entrypoints.lmeval import with_local_tasks

    forwarded = ["--model", "lingosteer", "--tasks", "xcopa_sw"]
    assert with_local_tasks(forwarded, data_dir, tmp_path) == [*forwarded, "--include_path", str(tmp_path)]
    assert (tmp_path / "xcopa_sw.yaml").is_file()
    for given in (["--include_path", "mine"], ["--include_path=mine"]):
        with pytest.raises(ValueError, match="--local-data and --include_path cannot go together"):
            with_local_tasks([*forwarded, *given], data_dir, tmp_path)
    with pytest.raises(FileNotFoundError, match="no XCOPA .* or XNLI .* files"):
        with_local_tasks(forwarded, tmp_path / "empty", tmp_path)
