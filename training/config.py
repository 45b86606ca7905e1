"""The training configuration of one interference-sweep encoder, loaded from YAML.

Every model size and optimisation setting is a field here, so the paper's setup
(configs/training/paper.yaml) and the CPU setup (configs/training/cpu.yaml) are
the same code with different numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class TrainingConfig:
    # Model (XLM-R layout: post-LN encoder layers, learned positions, tied MLM head).
    hidden_size: int = 768
    num_layers: int = 2
    num_heads: int = 12
    intermediate_size: int = 3072
    max_length: int = 256  # tokens per sentence including <s> and </s>
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    # Optimisation (AdamW, linear warm-up then cosine decay to zero).
    learning_rate: float = 1e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    grad_clip: float = 1.0
    steps: int = 10_000
    warmup_steps: int = 2_500
    batch_size: int = 32
    # Masked language modelling.
    mask_probability: float = 0.15
    # Data: every run sees this many training sentences in total (a pair takes half
    # from each language); None = the smallest number available among the sweep's languages.
    sentences_per_language: int | None = 1_000_000
    # Vocabulary: the tokenizer's ids occurring in the sweep's data, at most this many
    # (None = all of them); rarer ids map to <unk>, which is never a prediction target.
    vocab_limit: int | None = None
    eval_batch_size: int = 64
    eval_mask_seed: int = 1234  # the same masked positions in every run, independent of the run's seed

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0 < self.mask_probability < 1:
            raise ValueError(f"mask_probability must be in (0, 1), got {self.mask_probability}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if self.max_length < 3:
            raise ValueError(f"max_length must be at least 3 (<s> token </s>), got {self.max_length}")
        for name in ("steps", "batch_size", "eval_batch_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainingConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainingConfig":
        return self.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class CrossLingualAttentionConfig:
    """Structured cross-lingual attention (Foroutan et al. 2023, arXiv 2310.15258), off by default.

    A fine-tuning-time option of the encoder, kept out of `TrainingConfig` so that the
    interference sweep's recipe (and the identity of its results directories) is unchanged.
    See `training.model.cross_lingual_masks` for the masks these settings produce.
    """

    # A second query projection Q_cross whose scores serve the cross-language pairs (mask M2).
    cross_query: bool = False
    # Structured attention dropout p: while training, each cross-language pair leaves Q's mask M1
    # with probability p; pairs with the first token never do.
    cross_dropout: float = 0.0
    # The interfering variant's other half: while training, each same-language pair of a
    # code-switched sequence also joins M2 with this probability (the paper's cross_alpha).
    cross_query_overlap: float = 0.0

    def __post_init__(self) -> None:
        for name in ("cross_dropout", "cross_query_overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.cross_query_overlap and not self.cross_query:
            raise ValueError("cross_query_overlap needs cross_query: the overlap is of Q_cross's mask")

    @property
    def enabled(self) -> bool:
        return self.cross_query or self.cross_dropout > 0


def load_training_config(path: str | Path) -> TrainingConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} not found")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    try:
        return TrainingConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
