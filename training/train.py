"""One interference-sweep run: train an encoder on one language or a pair, evaluate MLM loss.

`train_run(("eng_Latn",), config, corpus, seed)` trains a monolingual model;
`train_run(("eng_Latn", "fra_Latn"), ...)` a bilingual one on the same total number
of sentences (half from each). The result holds the MLM loss on the SIB-200 test
sentences of each covered language, with masks drawn from a fixed seed so that every
run is scored on the same masked positions. Given the seed, a run is deterministic
(on CPU with a fixed thread count).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from training.config import TrainingConfig
from training.corpus import SweepCorpus
from training.model import MaskedLMEncoder


@dataclass
class RunResult:
    languages: tuple[str, ...]
    loss: dict[str, float]  # MLM loss on each covered language's SIB-200 test sentences
    seed: int
    steps: int
    final_train_loss: float  # mean training loss over the last 10% of steps
    training_sentences: dict[str, int]
    num_parameters: int
    train_seconds: float
    eval_seconds: float
    attention_backend: str

    def to_dict(self) -> dict:
        return {**asdict(self), "languages": list(self.languages)}


def pad_batch(sentences: list[np.ndarray], pad_id: int) -> torch.Tensor:
    rows = [torch.as_tensor(ids, dtype=torch.long) for ids in sentences]
    return pad_sequence(rows, batch_first=True, padding_value=pad_id)


def mask_tokens(
    input_ids: torch.Tensor, corpus: SweepCorpus, probability: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the ordinary tokens; of those 80% -> <mask>, 10% -> random, 10% kept."""
    maskable = input_ids >= corpus.num_special
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=generator)
    noise = torch.randint(corpus.num_special, corpus.vocab_size, input_ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(input_ids, corpus.mask_id), input_ids)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), noise, inputs)
    return inputs, labels


def learning_rate_factor(step: int, config: TrainingConfig) -> float:
    """Linear warm-up to the peak learning rate, then cosine decay to zero."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def configure_optimizer(
    model: torch.nn.Module, config: TrainingConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on >= 2-D parameters only (matrices, embeddings; not biases or norms), and
    its learning-rate schedule over `config.steps` (`learning_rate_factor`)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, config))
    return optimizer, schedule


def train_step(
    model: torch.nn.Module,
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float,
) -> None:
    """One update from a batch's loss: backward, clip the gradient norm, step the optimizer and the schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    schedule.step()


@torch.no_grad()
def evaluate_mlm(model: MaskedLMEncoder, corpus: SweepCorpus, language: str, config: TrainingConfig) -> float:
    """Token-averaged MLM loss on the language's test sentences, with masks fixed by `eval_mask_seed`."""
    model.eval()
    device = next(model.parameters()).device
    # Masks come from a CPU generator, so they are the same whatever device the model runs on.
    generator = torch.Generator().manual_seed(config.eval_mask_seed + zlib.crc32(language.encode()))
    sentences = corpus.test[language]
    total, count = 0.0, 0
    for start in range(0, len(sentences), config.eval_batch_size):
        batch = pad_batch(sentences[start : start + config.eval_batch_size], corpus.pad_id)
        inputs, labels = mask_tokens(batch, corpus, config.mask_probability, generator)
        batch_total, batch_count = model.loss_sum(inputs.to(device), labels.to(device))
        total, count = total + batch_total, count + batch_count
    if count == 0:
        raise ValueError(f"no maskable tokens in the {language} test sentences")
    return total / count


def train_run(
    languages: tuple[str, ...],
    config: TrainingConfig,
    corpus: SweepCorpus,
    seed: int,
    attention_backend: str | None = None,
    progress: bool = False,
    device: str | None = None,
) -> tuple[RunResult, MaskedLMEncoder]:
    """Train on `languages` (one or a pair) and evaluate; `device` defaults to CUDA when present. Returns the
    result and the trained encoder (kept by `sweep downstream` for evaluating its embeddings)."""
    languages = tuple(languages)
    if len(languages) not in (1, 2) or len(set(languages)) != len(languages):
        raise ValueError(f"a run covers one language or two different ones, got {languages}")
    missing = [lang for lang in languages if lang not in corpus.train]
    if missing:
        raise ValueError(f"languages {missing} are not in the sweep corpus ({', '.join(corpus.languages)})")

    total = config.sentences_per_language or corpus.max_sentences_per_run()
    by_language = corpus.training_sentences(languages, total)
    pool = [ids for sentences in by_language.values() for ids in sentences]

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = MaskedLMEncoder(config, corpus.vocab_size, corpus.pad_id, attention_backend).to(device)
    optimizer, schedule = configure_optimizer(model, config)

    started = time.perf_counter()
    model.train()
    order, cursor, recent = torch.randperm(len(pool), generator=generator), 0, []
    for step in tqdm(range(config.steps), desc="+".join(languages), disable=not progress, leave=False):
        if cursor + config.batch_size > len(order):  # next epoch: a fresh shuffle
            order, cursor = torch.randperm(len(pool), generator=generator), 0
        batch = pad_batch([pool[i] for i in order[cursor : cursor + config.batch_size].tolist()], corpus.pad_id)
        cursor += config.batch_size
        inputs, labels = mask_tokens(batch, corpus, config.mask_probability, generator)
        if not (labels != -100).any():
            continue
        loss = model(inputs.to(device), labels.to(device))
        train_step(model, loss, optimizer, schedule, config.grad_clip)
        if step >= config.steps - max(1, config.steps // 10):
            recent.append(loss.item())
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    losses = {language: evaluate_mlm(model, corpus, language, config) for language in languages}
    result = RunResult(
        languages=languages,
        loss=losses,
        seed=seed,
        steps=config.steps,
        final_train_loss=float(np.mean(recent)) if recent else float("nan"),
        training_sentences={lang: len(sentences) for lang, sentences in by_language.items()},
        num_parameters=sum(p.numel() for p in model.parameters()),
        train_seconds=train_seconds,
        eval_seconds=time.perf_counter() - started,
        attention_backend=model.attention_backend,
    )
    return result, model
