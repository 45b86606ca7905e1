"""The lm-eval model `lingosteer`, run through `lingosteer lm-eval` on a local task file.

One lm-eval run (one engine, in a subprocess) scores two tasks over the same items: the
`_sw` task is steered with the planted swh_Latn intervention (language=auto), the `_en`
task runs plain; a third, `steergen_sw`, generates steered. A second engine, in this
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

from evaluation.lmeval_backend import check_request, resolve_language
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
               "--output_path", str(tmp_path / "out"), "--log_samples"]
    return subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory, model_dir, interventions, data_dir):
    """{task: [(context, continuation, loglikelihood), ...], GENERATE_TASK: [(context, text), ...]},
    as lm-eval logged them."""
    tmp_path = tmp_path_factory.mktemp("lm-eval")
    sentences = [row.text for row in load_sib200("swh_Latn", ("dev",), data_dir)[: N_ITEMS + 2]]
    items = [{"premise": sentences[i], "choice1": sentences[i + 1], "choice2": sentences[i + 2], "label": i % 2}
             for i in range(N_ITEMS)]
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks", items)
    done = run_lm_eval(tmp_path, f"pretrained={model_dir},interventions={interventions},language=auto,"
                                 f"max_model_len=512,enforce_eager=True", ",".join([*SCORE_TASKS, GENERATE_TASK]))
    assert done.returncode == 0, done.stderr[-4000:]

    def samples(task):
        [path] = (tmp_path / "out").rglob(f"samples_{task}_*.jsonl")
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    logged = {}
    for task in SCORE_TASKS:
        logged[task] = [(args["arg_0"], args["arg_1"], float(resp[0][0]))  # logged as text
                        for sample in samples(task)
                        for args, resp in zip(sample["arguments"].values(), sample["resps"])]
        assert len(logged[task]) == 2 * N_ITEMS
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
        # lm-eval's pairing: context alone, the whole text, the continuation is the rest.
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        return Encoded(tuple(whole), len(context_ids), leading_special(context_ids, special))

    requests = [(encode(ctx, cont), condition) for task, condition in zip(SCORE_TASKS, (STEERED, PLAIN))
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
    theirs = np.array([ll for task in SCORE_TASKS for _, _, ll in lm_eval_run[task]])
    np.testing.assert_allclose(theirs, scores, atol=1e-4)
    # the same pairs in both tasks: steering changed them
    assert [row[:2] for row in lm_eval_run[SCORE_TASKS[0]]] == [row[:2] for row in lm_eval_run[SCORE_TASKS[1]]]
    assert np.abs(theirs[: 2 * N_ITEMS] - theirs[2 * N_ITEMS:]).max() > 1e-2


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
