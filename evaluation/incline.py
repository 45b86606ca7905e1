"""INCLINE as published (arXiv 2410.12462, the authors' released `intervention.py`): the reference to beat.

What makes these numbers INCLINE's protocol rather than lingosteer's (methods.md, section 1):
- the maps: min-norm lstsq on mean-pooled layer outputs, no bias, the first 500 parallel
  lines with every odd one code-switched (`lingosteer align fit --recipe incline`);
- the edit: h + s * (h W) at the LAST PROMPT TOKEN of every layer, each layer's value
  computed from ONE CLEAN forward pass and written into a second pass, so edits do not
  compound across layers (the serving plugin's do: each layer sees the earlier ones' edits);
  later tokens see the edit only through attention to that token;
- the task: asked with their English instruction prompt (`Task.incline` in evaluation/tasks.py:
  XCOPA from their released `intervention.py`; XNLI, which it lacks, from a public data-loading
  script of the first author's with the same XCOPA prompt, docs/benchmarks.md), the gold
  answer teacher-forced after it, and scored by exact match of the argmax tokens at the answer
  positions (not a log-likelihood comparison);
- the strength: s swept over their grid, and the best s on the evaluated items reported.
  That selection sees the labels it is scored on, so `summarise` reports it labelled as
  such and, beside it, s chosen for each fold on the other folds only.

Scoring shares work the way a KV cache allows: the prompt without its last token is run
once per item, the clean pass of the last token once, and the steered passes (the last
prompt token and the answer, one row per strength) all reuse the prefix's keys and values.
`answer_logits_uncached` is the same protocol without those shortcuts, the reference the
tests compare against.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
import torch

from alignment.artifact import Intervention
from alignment.hf_steering import hidden_of, layer_hooks, with_hidden
from evaluation.calibration import choose_alpha, cross_validate
from lingosteer.stats import bootstrap_delta_ci
from evaluation.tasks import XCOPA, Task

# Their list reads [-1, ..., -0.4, -0.3-0.2, -0.1, 0, 0.1, ..., 1]: `-0.3-0.2` evaluates to -0.5,
# so -0.3 and -0.2 were never tried. These are the strengths their code did try.
GRID = tuple(round(step / 10, 1) for step in range(-10, 11) if step not in (-3, -2))
# Stripped from the decoded answer before the exact match, in their order.
PUNCTUATION = (".</s>", ".\n", ".", ";", "!", ",", "?", "\n", "</s>", "<pad>")
FOLDS = 5


def question(item, task: Task = XCOPA) -> str:
    """INCLINE's English instruction prompt for one item (XCOPA's question word in English)."""
    return task.incline.prompt.format(**asdict(item))


def normalise(answer: str) -> str:
    answer = answer.strip().lower()
    for mark in PUNCTUATION:
        answer = answer.replace(mark, "")
    return answer


def _maps(intervention: Intervention, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (D, b): an artifact of form "incline" stores D = W_incline^T, so h + s (D h + b) is their edit."""
    if intervention.manifest.form != "incline":
        raise ValueError(f"{intervention.path}: INCLINE's protocol needs an artifact of form 'incline' "
                         "(fit it with `lingosteer align fit --recipe incline`)")
    return {layer: intervention.delta(layer) for layer in layers}


def _capture(store: dict, position: int):
    def of_layer(layer):
        def hook(module, inputs, output):
            store[layer] = hidden_of(output)[0, position].float().clone()
        return hook
    return of_layer


def _overwrite(values: dict[int, torch.Tensor], position: int):
    """Write values[layer] ([rows, d]) into every row's `position` of that layer's output."""
    def of_layer(layer):
        def hook(module, inputs, output):
            hidden = hidden_of(output).clone()
            hidden[:, position] = values[layer].to(hidden.dtype)
            return with_hidden(output, hidden)
        return hook
    return of_layer


def _targets(clean: dict[int, torch.Tensor], maps: dict, strengths: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's overwrite value per strength: h + s (D h + b), h from the clean pass."""
    return {layer: h + strengths[:, None] * (maps[layer][0] @ h + maps[layer][1]) for layer, h in clean.items()}


def _encode(tokenizer, item, task: Task = XCOPA) -> tuple[torch.Tensor, int, str]:
    """(prompt + ' ' + gold answer ids [1, T], index of the last prompt token, gold answer)."""
    answer = task.incline.answers[item.label]
    prompt = question(item, task)
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    full_ids = tokenizer(f"{prompt} {answer}", return_tensors="pt").input_ids
    last = prompt_ids.shape[1] - 1
    if not torch.equal(full_ids[0, : last + 1], prompt_ids[0]):
        raise ValueError(f"the prompt's tokens change when the answer follows it: {prompt!r}")
    return full_ids, last, answer


def _correct(tokenizer, logits: torch.Tensor, answer: str) -> list[bool]:
    # The answer positions: the last prompt token (predicts the answer's first token), each answer
    # token (predicts the next; their target was ' A</s>', so anything but an end or a punctuation
    # mark after the answer fails the match).
    texts = tokenizer.batch_decode(logits.argmax(-1), skip_special_tokens=True)
    return [normalise(text) == answer.lower() for text in texts]


def _setup(tokenizer, intervention: Intervention, item, task: Task):
    """(steered layers, their (D, b), prompt + answer ids, last prompt index)."""
    layers = list(intervention.layers)
    full_ids, last, _ = _encode(tokenizer, item, task)
    return layers, _maps(intervention, layers), full_ids, last


@torch.no_grad()
def answer_logits(model, tokenizer, intervention: Intervention, item, grid=GRID, task: Task = XCOPA) -> torch.Tensor:
    """[len(grid), answer positions, vocab]: the logits at the answer positions under every strength s."""
    layers, maps, full_ids, last = _setup(tokenizer, intervention, item, task)
    prefix = model(full_ids[:, :last], use_cache=True).past_key_values
    clean = {}
    with layer_hooks(model, layers, _capture(clean, 0)):
        model(full_ids[:, last : last + 1], past_key_values=copy.deepcopy(prefix), use_cache=True)
    prefix.batch_repeat_interleave(len(grid))
    answer = full_ids[:, last:].expand(len(grid), -1)
    with layer_hooks(model, layers, _overwrite(_targets(clean, maps, torch.tensor(grid, dtype=torch.float32)), 0)):
        return model(answer, past_key_values=prefix, use_cache=True).logits.float()


@torch.no_grad()
def answer_logits_uncached(model, tokenizer, intervention: Intervention, item, grid=GRID,
                           task: Task = XCOPA) -> torch.Tensor:
    """The same, as their code computes it: a clean pass, then one full steered pass per strength."""
    layers, maps, full_ids, last = _setup(tokenizer, intervention, item, task)
    clean = {}
    with layer_hooks(model, layers, _capture(clean, last)):
        model(full_ids[:, : last + 1])
    rows = []
    for strength in grid:
        targets = _targets(clean, maps, torch.tensor([strength], dtype=torch.float32))
        with layer_hooks(model, layers, _overwrite(targets, last)):
            rows.append(model(full_ids).logits[:, last:].float())
    return torch.cat(rows)


# The two ways a prompt's answer is read: theirs, and the log-likelihood reading lm-eval uses.
METRICS = {
    "exact_match": "their scoring: the argmax tokens at the answer positions, punctuation stripped, equal the answer",
    "answer_likelihood": "the same edit and prompt, read as lm-eval reads multiple choice: the answer (' A' / "
                         "' B'; ' true' / ' inconclusive' / ' false') whose first token has the highest logit at "
                         "the last prompt token",
}


def score_items(model, tokenizer, intervention: Intervention, items, grid=GRID, task: Task = XCOPA,
                progress: bool = False) -> dict[str, np.ndarray]:
    """METRICS name -> [len(grid), n] bool: the correctness of every item under every strength s."""
    from tqdm.auto import tqdm

    answers = task.incline.answers
    # Each answer's first token (Gemma's tokenizer keeps every answer whole); they must differ.
    answer_ids = [tokenizer(f" {answer}", add_special_tokens=False).input_ids[0] for answer in answers]
    if len(set(answer_ids)) != len(answers):
        raise ValueError(f"the answers {answers} start with the same token under this tokenizer: {answer_ids}")
    correct = {name: np.zeros((len(grid), len(items)), dtype=bool) for name in METRICS}
    for i, item in enumerate(tqdm(items, desc="INCLINE", disable=not progress)):
        logits = answer_logits(model, tokenizer, intervention, item, grid, task)
        correct["exact_match"][:, i] = _correct(tokenizer, logits, answers[item.label])
        correct["answer_likelihood"][:, i] = logits[:, 0, answer_ids].argmax(-1).numpy() == item.label
    return correct


def summarise(correct: np.ndarray, grid=GRID, folds: int = FOLDS, resamples: int = 10000, seed: int = 0) -> dict:
    """Plain (s = 0), the best s on these very items (as published), and s chosen by cross-validation;
    CIs from `resamples` paired bootstrap resamples (the bench's --bootstrap)."""

    correct = np.asarray(correct, dtype=bool)
    plain = correct[list(grid).index(0.0)]
    accuracy = correct.mean(axis=1)
    best = int(np.argmax(accuracy))  # the first maximum, as a sweep that keeps the best score finds it
    cross_validated, fold_strengths = cross_validate(
        dict(zip(grid, correct)), lambda items: choose_alpha(tuple(grid), correct[:, items])[0], folds)
    return {
        "items": int(plain.size),
        "plain": float(plain.mean()),
        "best_on_items": {"s": float(grid[best]), "accuracy": float(accuracy[best]),
                          "delta_ci95": list(bootstrap_delta_ci([(plain, correct[best])], resamples, seed))},
        "cross_validated": {"s_per_fold": fold_strengths, "accuracy": float(cross_validated.mean()),
                            "delta_ci95": list(bootstrap_delta_ci([(plain, cross_validated)], resamples, seed))},
        "accuracy_per_s": {f"{s:g}": float(a) for s, a in zip(grid, accuracy)},
        "correct_plain": plain.tolist(),
        "correct_cross_validated": cross_validated.tolist(),
    }


def report_section(languages: dict[str, dict[str, dict]], resamples: int = 10000, seed: int = 0) -> dict:
    """The benchmark report's "incline" section. `languages`: code -> metric -> `summarise` output (plus
    "intervention"). Per language and metric, and the mean over languages, both selections against
    plain with paired bootstrap CIs; per-item lists stay out of the report."""

    means = {}
    for metric in METRICS:
        rows = [r[metric] for r in languages.values()]
        if rows:
            pairs = [(np.array(r["correct_plain"]), np.array(r["correct_cross_validated"])) for r in rows]
            means[metric] = {"plain": float(np.mean([r["plain"] for r in rows])),
                             "best_on_items": float(np.mean([r["best_on_items"]["accuracy"] for r in rows])),
                             "cross_validated": float(np.mean([r["cross_validated"]["accuracy"] for r in rows])),
                             "cross_validated_delta_ci95": list(bootstrap_delta_ci(pairs, resamples, seed))}
    return {
        "protocol": "INCLINE as published: English instruction prompt, gold answer teacher-forced; "
                    "h + s (h W) at the last prompt token of every layer from one clean pass (non-compounding)",
        "metrics": METRICS,
        "grid": list(GRID),
        "selection": {"best_on_items": "the s with the best accuracy on the evaluated items themselves, as the "
                                       "paper reports it (it sees the labels it is scored on)",
                      "cross_validated": f"s chosen for each of {FOLDS} contiguous folds on the other folds"},
        "languages": {code: {key: ({k: v for k, v in value.items() if not k.startswith("correct_")}
                                   if key in METRICS else value) for key, value in r.items()}
                      for code, r in languages.items()},
        "mean": means or None,
    }
