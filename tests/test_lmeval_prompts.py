"""Our "lm-eval" XCOPA prompts are lm-evaluation-harness's own, string for string.

The installed lm-eval builds its `xcopa` group (every `xcopa_<lang>` task) from its
task files with its TaskManager, and its request builder (`build_all_requests`)
turns each item into loglikelihood requests (context, target_delimiter + choice).
Only the dataset download is replaced: `datasets.load_dataset` hands lm-eval our
validation file of the language instead of the Hub's `cambridgeltl/xcopa`, so the
test runs offline and compares the same items on both sides.
"""

import json
from pathlib import Path

import datasets
import lm_eval.api.task
import lm_eval.tasks
import pytest
from lm_eval.tasks import TaskManager

from evaluation.tasks import XCOPA, build_examples, load_items, load_prompts

LMEVAL_XCOPA_DIR = Path(lm_eval.tasks.__file__).parent / "xcopa"
# XCOPA has 11 languages; fewer tasks would mean the group was not read as expected.
MIN_LANGUAGES = 11


@pytest.fixture(scope="module")
def lmeval_xcopa(data_dir):
    """lm-eval's requests per language: {lang: (task, {doc_id: (context, [continuations])})}."""
    xcopa_dir = data_dir / "xcopa"

    def local_xcopa(path, name=None, **kwargs):
        # lm-eval asks for (cambridgeltl/xcopa, <lang>); both of its splits get our
        # validation file (it scores the test split, whose prompts are built alike).
        file = xcopa_dir / f"val.{name}.jsonl"
        if not file.is_file():
            pytest.fail(f"lm-eval defines XCOPA language {name!r} but {file} is missing; "
                        f"every lm-eval language must be compared")
        records = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        docs = datasets.Dataset.from_list(records)
        return datasets.DatasetDict(validation=docs, test=docs)

    # Only lm-eval's XCOPA folder is indexed (the full index of all tasks is slow).
    manager = TaskManager(include_path=str(LMEVAL_XCOPA_DIR), include_defaults=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval.api.task.datasets, "load_dataset", local_xcopa)
        tasks = manager.load("xcopa")["tasks"]

    found = {}
    for task in tasks.values():
        task.build_all_requests()
        requests: dict[int, tuple[str, list[str]]] = {}
        for instance in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
            context, continuation = instance.arguments
            ctx, conts = requests.setdefault(instance.doc_id, (context, []))
            assert ctx == context, f"{task.config.task}: one doc, two contexts"
            conts.append(continuation)
        found[task.config.dataset_name] = (task, requests)
    return found


def test_lmeval_defines_every_xcopa_language(lmeval_xcopa):
    assert len(lmeval_xcopa) >= MIN_LANGUAGES, f"lm-eval's xcopa group gave only {sorted(lmeval_xcopa)}"
    # Every lm-eval language has its connector words in our configuration.
    missing = sorted(set(lmeval_xcopa) - set(load_prompts(XCOPA)["connectors"]))
    assert not missing, f"configs/bench/xcopa.yaml lacks lm-eval's XCOPA languages {missing}"


def test_xcopa_prompts_equal_lmeval(lmeval_xcopa, data_dir):
    prompts = load_prompts(XCOPA)
    mismatches = []
    for lang, (task, requests) in sorted(lmeval_xcopa.items()):
        items = load_items(XCOPA, data_dir / "xcopa" / f"val.{lang}.jsonl")
        examples = build_examples(XCOPA, lang, items, prompts, "lm-eval")
        docs = task.eval_docs
        assert len(requests) == len(docs) == len(examples), f"{lang}: item counts differ"
        for doc_id, (context, continuations) in sorted(requests.items()):
            ours, doc = examples[doc_id], docs[doc_id]
            assert doc["idx"] == items[doc_id].idx, f"{lang}: items out of order"
            gold = task.doc_to_target(doc)
            if (ours.context, list(ours.options), ours.label) != (context, continuations, gold):
                mismatches.append(f"{lang} idx {doc['idx']}: ours {ours.context!r} {ours.options!r} label "
                                  f"{ours.label}; lm-eval {context!r} {continuations!r} label {gold}")
    assert not mismatches, f"{len(mismatches)} prompts differ from lm-eval's:\n" + "\n".join(mismatches[:10])
