"""Loaders for the multilingual data sets: SIB-200/FLORES, NTREX-128, Tatoeba, XCOPA, XNLI.

Every loader takes `data_dir` (None means `lingosteer.DEFAULT_DATA_DIR`); the
formats are those of `../shared/data/README.md`. A data directory may be the
root holding `sib200/` and `ntrex128/`, or the corpus folder itself.

Languages may be given by any code of the language table (`sw`, `swh`,
`swh_Latn`, `swa`). A code that names a folder or file of the corpus as it
stands is used as is, so SIB-200 languages missing from the table (`ace_Arab`)
and NTREX regional variants (`por-BR`, `eng-GB`) work too.

Bad input fails loudly: malformed lines raise ValueError naming `file:line`,
line-aligned files of different lengths raise ValueError, missing files or
languages raise FileNotFoundError listing what is there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lingosteer import DEFAULT_DATA_DIR
from lingosteer.languages import UnknownLanguageError, get_language

SIB200_SPLITS = ("train", "dev", "test")
XNLI_LABELS = ("entailment", "neutral", "contradiction")  # label ints 0, 1, 2
XCOPA_QUESTIONS = ("cause", "effect")
NTREX_ENGLISH_SOURCE = "newstest2019-src.eng.txt"


# --- small file helpers ------------------------------------------------------


def _root(data_dir: Path | str | None) -> Path:
    return Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)


def _corpus_dir(data_dir: Path | str | None, subdir: str, looks_like_corpus) -> Path:
    """`data_dir/subdir`, or `data_dir` itself when it already is the corpus folder."""
    root = _root(data_dir)
    if (root / subdir).is_dir():
        return root / subdir
    if root.is_dir() and looks_like_corpus(root):
        return root
    raise FileNotFoundError(f"no {subdir} data in {root} (expected {root / subdir} or the {subdir} folder itself)")


def _read_lines(path: Path) -> list[str]:
    """Lines split on '\\n' only: str.splitlines() would also split on U+2028 and
    friends inside a sentence and silently break line alignment."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        text = f.read()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _numbered_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(`file:line` location, line) for every non-blank line."""
    for number, line in enumerate(_read_lines(path), start=1):
        if line.strip():
            yield f"{path}:{number}", line


def _check_file(path: Path, what: str) -> Path:
    if not path.is_file():
        available = sorted(p.name for p in path.parent.glob("*")) if path.parent.is_dir() else []
        listing = f"; files there: {', '.join(available)}" if available else ""
        raise FileNotFoundError(f"{what}: {path} not found{listing}")
    return path


def _aligned_pairs(src_path: Path, tgt_path: Path) -> list[tuple[str, str]]:
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(
            f"line-aligned files differ in length: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)}"
        )
    for path, lines in ((src_path, src), (tgt_path, tgt)):
        empty = next((number for number, line in enumerate(lines, start=1) if not line.strip()), None)
        if empty is not None:
            raise ValueError(f"{path}:{empty}: empty line in a line-aligned parallel file")
    return _refuse_duplicate_pairs(list(zip(src, tgt)), f"{src_path} + {tgt_path}")


def _refuse_duplicate_pairs(pairs: list[tuple[str, str]], where: str) -> list[tuple[str, str]]:
    """A pair seen twice would be fitted twice and could sit on both sides of a fit/eval split."""
    first_seen: dict[tuple[str, str], int] = {}
    for number, pair in enumerate(pairs, start=1):
        if pair in first_seen:
            raise ValueError(f"{where}: pair {number} duplicates pair {first_seen[pair]} ({pair[0][:60]!r})")
        first_seen[pair] = number
    return pairs


# --- SIB-200 (FLORES-200 sentences with topic labels) --------------------------


@dataclass(frozen=True)
class SibRow:
    index_id: int  # the same id is the same FLORES sentence in every language
    category: str
    text: str


def _sib_dir(data_dir: Path | str | None) -> Path:
    return _corpus_dir(data_dir, "sib200", lambda d: (d / "eng_Latn").is_dir())


def _sib_language_dir(sib: Path, lang: str) -> Path:
    if (sib / lang).is_dir():
        return sib / lang
    try:
        path = sib / get_language(lang).flores
    except UnknownLanguageError:
        path = None
    if path is None or not path.is_dir():
        available = sorted(p.name for p in sib.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"no SIB-200 folder for language {lang!r} in {sib}; {len(available)} available: {' '.join(available)}"
        )
    return path


def _check_sib_splits(splits: tuple[str, ...]) -> tuple[str, ...]:
    if not splits or any(s not in SIB200_SPLITS for s in splits):
        raise ValueError(f"SIB-200 splits must be some of {', '.join(SIB200_SPLITS)}; "
                         f"got {', '.join(splits) or 'none'}")
    return splits


def load_sib200(
    lang: str, splits: Sequence[str] = ("train", "dev"), data_dir: Path | str | None = None
) -> list[SibRow]:
    """The SIB-200 rows of one language, splits concatenated in the order given."""
    splits = _check_sib_splits((splits,) if isinstance(splits, str) else tuple(splits))
    folder = _sib_language_dir(_sib_dir(data_dir), lang)
    rows: list[SibRow] = []
    for split in splits:
        path = _check_file(folder / f"{split}.tsv", f"SIB-200 {split} split")
        lines = _numbered_lines(path)
        header = next(lines, (f"{path}:1", ""))
        if header[1].split("\t") != ["index_id", "category", "text"]:
            raise ValueError(f"{header[0]}: expected the header 'index_id<TAB>category<TAB>text'")
        for where, line in lines:
            fields = line.split("\t")
            if len(fields) != 3 or not fields[0].isdigit():
                raise ValueError(f"{where}: expected 'index_id<TAB>category<TAB>text' with an integer id")
            rows.append(SibRow(int(fields[0]), fields[1], fields[2]))
    return rows


def parallel_sib200(
    src: str, tgt: str, splits: Sequence[str] = ("train", "dev"), data_dir: Path | str | None = None
) -> list[tuple[str, str]]:
    """(src_text, tgt_text) pairs of the same FLORES sentences, in the source file order."""
    source = load_sib200(src, splits, data_dir)
    target = {row.index_id: row.text for row in load_sib200(tgt, splits, data_dir)}
    missing = [row.index_id for row in source if row.index_id not in target]
    if missing or len(target) != len(source):
        raise ValueError(
            f"SIB-200 {src} and {tgt} ({', '.join(splits)}) do not hold the same sentences: "
            f"{len(source)} vs {len(target)} rows, {len(missing)} source ids missing in the target"
        )
    return [(row.text, target[row.index_id]) for row in source]


# --- NTREX-128 (line-aligned news translations) --------------------------------


def _ntrex_file(ntrex: Path, lang: str) -> Path:
    direct = ntrex / f"newstest2019-ref.{lang}.txt"
    if direct.is_file():
        return direct
    code = get_language(lang).ntrex
    if code == "eng":
        return _check_file(ntrex / NTREX_ENGLISH_SOURCE, "NTREX-128 English source")
    path = ntrex / f"newstest2019-ref.{code}.txt"
    if not code or not path.is_file():
        available = sorted(p.name.split(".")[1] for p in ntrex.glob("newstest2019-ref.*.txt"))
        raise FileNotFoundError(
            f"no NTREX-128 file for language {lang!r} in {ntrex}; "
            f"{len(available)} available (and eng): {' '.join(available)}"
        )
    return path


def _ntrex_dir(data_dir: Path | str | None) -> Path:
    return _corpus_dir(data_dir, "ntrex128", lambda d: (d / NTREX_ENGLISH_SOURCE).is_file())


def load_ntrex(lang: str, data_dir: Path | str | None = None) -> list[str]:
    """The NTREX-128 sentences (1997 news sentences) of one language, in file order."""
    return _read_lines(_ntrex_file(_ntrex_dir(data_dir), lang))


def parallel_ntrex(src: str, tgt: str, data_dir: Path | str | None = None) -> list[tuple[str, str]]:
    """(src_line, tgt_line) pairs of NTREX-128, line i with line i."""
    ntrex = _ntrex_dir(data_dir)
    return _aligned_pairs(_ntrex_file(ntrex, src), _ntrex_file(ntrex, tgt))


# --- Tatoeba, LASER layout: tatoeba.{xx}-eng.{xx} and tatoeba.{xx}-eng.eng ------


def parallel_tatoeba(lang: str, data_dir: Path | str | None = None) -> list[tuple[str, str]]:
    """(lang_sentence, english_sentence) pairs of the LASER Tatoeba test set."""
    folder = _corpus_dir(data_dir, "tatoeba", lambda d: any(d.glob("tatoeba.*-eng.eng")))
    code = lang if (folder / f"tatoeba.{lang}-eng.{lang}").is_file() else get_language(lang).tatoeba_code
    src, eng = folder / f"tatoeba.{code}-eng.{code}", folder / f"tatoeba.{code}-eng.eng"
    if not (src.is_file() and eng.is_file()):
        available = sorted(p.name.split(".")[1].removesuffix("-eng") for p in folder.glob("tatoeba.*-eng.eng"))
        raise FileNotFoundError(
            f"no Tatoeba pair {src.name} + {eng.name} in {folder}; available: {' '.join(available) or 'none'}"
        )
    return _aligned_pairs(src, eng)


# --- XCOPA ---------------------------------------------------------------------


@dataclass(frozen=True)
class XcopaItem:
    premise: str
    choice1: str
    choice2: str
    question: str  # "cause" or "effect"
    label: int  # 0: choice1 is right, 1: choice2
    idx: int


def _json_lines(path: Path | str) -> Iterator[tuple[str, dict]]:
    path = _check_file(Path(path), "JSON lines file")
    for where, line in _numbered_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object")
        yield where, record


def _fields(record: dict, where: str, types: dict[str, type]) -> dict:
    missing = [k for k in types if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    wrong = [k for k, t in types.items() if not isinstance(record[k], t) or isinstance(record[k], bool)]
    if wrong:
        raise ValueError(f"{where}: field(s) {', '.join(wrong)} of the wrong type")
    return {k: record[k] for k in types}


def load_xcopa(path: Path | str) -> list[XcopaItem]:
    """XCOPA items from a JSON lines file (`val.sw.jsonl`, `train.en.jsonl`, ...)."""
    types = {"premise": str, "choice1": str, "choice2": str, "question": str, "label": int, "idx": int}
    items = []
    for where, record in _json_lines(path):
        item = XcopaItem(**_fields(record, where, types))
        if item.label not in (0, 1) or item.question not in XCOPA_QUESTIONS:
            raise ValueError(f"{where}: label must be 0 or 1 and question cause or effect")
        empty = [name for name in ("premise", "choice1", "choice2") if not getattr(item, name).strip()]
        if empty:
            raise ValueError(f"{where}: empty {' and '.join(empty)}")
        items.append(item)
    return items


def parallel_xcopa(lang: str, xcopa_dir: Path | str | None = None) -> list[tuple[str, str]]:
    """(sentence, English translation) pairs of the XCOPA validation items: premise,
    choice1 and choice2 of each item, against `translated-en/val.{lang}.jsonl`."""
    folder = _corpus_dir(xcopa_dir, "xcopa", lambda d: (d / "translated-en").is_dir())
    code = lang if (folder / f"val.{lang}.jsonl").is_file() else get_language(lang).iso639_1
    source, english = folder / f"val.{code}.jsonl", folder / "translated-en" / f"val.{code}.jsonl"
    if not english.is_file():
        available = sorted(p.name.split(".")[1] for p in (folder / "translated-en").glob("val.*.jsonl"))
        raise FileNotFoundError(f"no English translation {english} of XCOPA {code!r}; available: {' '.join(available)}")
    items, translated = load_xcopa(source), load_xcopa(english)
    if [item.idx for item in items] != [item.idx for item in translated]:
        raise ValueError(f"{source} and {english} do not hold the same items in the same order")
    sentences = lambda item: (item.premise, item.choice1, item.choice2)  # noqa: E731
    return [pair for a, b in zip(items, translated) for pair in zip(sentences(a), sentences(b))]


def code_switched(pairs: list[tuple[str, str]], every: int = 2) -> list[tuple[str, str]]:
    """Code-switched fitting lines: every `every`-th pair becomes (source + ' ' + target, target + ' ' + target),
    so the map also sees sentences that switch into the target language half-way.

    The default is INCLINE's lines: every odd pair (0-based). `every=1` switches every pair: the
    code-switched set that bench/alignment_recipes.py adds to SIB-200 (docs/alignment.md's
    "sib + code-switched" row was computed with it)."""
    return [(f"{s} {t}", f"{t} {t}") if i % every == every - 1 else (s, t) for i, (s, t) in enumerate(pairs)]


# --- XNLI ----------------------------------------------------------------------


@dataclass(frozen=True)
class XnliItem:
    premise: str
    hypothesis: str
    label: int  # 0 entailment, 1 neutral, 2 contradiction (XNLI_LABELS)


def load_xnli(path: Path | str) -> list[XnliItem]:
    """XNLI items from `premise<TAB>hypothesis<TAB>label-name` TSV (no header) or from
    JSON lines with `premise`, `hypothesis` and `label` 0/1/2 (chosen by the suffix
    `.jsonl`/`.json`); both give labels as ints 0/1/2."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        items = []
        for where, record in _json_lines(path):
            item = XnliItem(**_fields(record, where, {"premise": str, "hypothesis": str, "label": int}))
            if item.label not in (0, 1, 2):
                raise ValueError(f"{where}: label must be 0, 1 or 2, got {item.label}")
            if not item.premise.strip() or not item.hypothesis.strip():
                raise ValueError(f"{where}: empty premise or hypothesis")
            items.append(item)
        return items
    items = []
    for where, line in _numbered_lines(_check_file(path, "XNLI file")):
        fields = line.split("\t")
        if len(fields) != 3 or fields[2] not in XNLI_LABELS:
            raise ValueError(
                f"{where}: expected 'premise<TAB>hypothesis<TAB>label' with label one of {', '.join(XNLI_LABELS)}"
            )
        if not fields[0].strip() or not fields[1].strip():
            raise ValueError(f"{where}: empty premise or hypothesis")
        items.append(XnliItem(fields[0], fields[1], XNLI_LABELS.index(fields[2])))
    return items


# --- parallel-source specs (the CLI's --data) -----------------------------------

PARALLEL_CORPORA = ("sib200", "ntrex", "xcopa", "tatoeba")
LINE_RANGE_CORPORA = ("ntrex", "xcopa")  # `ntrex:0-299`: a slice of the pairs


@dataclass(frozen=True)
class ParallelSource:
    """A parallel corpus chosen on the command line; see `parse_parallel_source`."""

    corpus: str
    splits: tuple[str, ...]  # SIB-200 only; () for the others
    data_dir: Path
    lines: tuple[int, int] | None = None  # NTREX / XCOPA: pairs first..last (0-based, inclusive)

    def pairs(self, src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
        """(src_text, tgt_text) pairs between two languages."""
        pairs = self._all_pairs(src_lang, tgt_lang)
        if self.lines is None:
            return pairs
        first, last = self.lines
        if last >= len(pairs):
            raise ValueError(f"{self.corpus} has {len(pairs)} {src_lang}-{tgt_lang} pairs; "
                             f"the range {first}-{last} asks for more")
        return pairs[first : last + 1]

    def _all_pairs(self, src_lang: str, tgt_lang: str) -> list[tuple[str, str]]:
        if self.corpus == "sib200":
            return parallel_sib200(src_lang, tgt_lang, self.splits, self.data_dir)
        if self.corpus == "ntrex":
            return parallel_ntrex(src_lang, tgt_lang, self.data_dir)
        if self.corpus == "xcopa":  # items translated to English only
            if not _is_english(tgt_lang):
                raise ValueError(f"XCOPA items have English translations only; got {src_lang} -> {tgt_lang}")
            return parallel_xcopa(src_lang, self.data_dir)
        # Tatoeba pairs every language with English only.
        if _is_english(tgt_lang):
            return parallel_tatoeba(src_lang, self.data_dir)
        if _is_english(src_lang):
            return [(eng, other) for other, eng in parallel_tatoeba(tgt_lang, self.data_dir)]
        raise ValueError(f"Tatoeba pairs languages with English only; got {src_lang} -> {tgt_lang}")

    def describe(self) -> dict:
        """What the pairs came from, for manifests."""
        described = {"corpus": self.corpus, "splits": list(self.splits), "data_dir": str(self.data_dir)}
        return described if self.lines is None else {**described, "lines": list(self.lines)}


def _is_english(lang: str) -> bool:
    try:
        return get_language(lang).flores == "eng_Latn"
    except UnknownLanguageError:
        return False


def parse_parallel_source(spec: str, default_data_dir: Path | str | None = None) -> ParallelSource:
    """Parse `CORPUS[:SPLITS][@DIR]`.

    CORPUS is sib200, ntrex, xcopa (validation items against their English
    translations: short everyday sentences) or tatoeba; SPLITS (SIB-200 only, comma-separated,
    default train,dev) picks SIB-200 splits, and for ntrex and xcopa `:FIRST-LAST`
    keeps pairs FIRST..LAST (0-based, inclusive); DIR is the data root or the corpus
    folder (default: `default_data_dir`, else lingosteer.DEFAULT_DATA_DIR).
    Examples: `sib200`, `sib200:train,dev`, `sib200:test@/data/flores`,
    `ntrex@/data/ntrex128`, `tatoeba@/data/LASER/tatoeba/v1`.
    """
    head, at, folder = spec.strip().partition("@")
    corpus, colon, split_list = head.partition(":")
    corpus = corpus.strip().lower()
    if corpus not in PARALLEL_CORPORA:
        raise ValueError(
            f"unknown parallel corpus {corpus!r} in {spec!r}; expected CORPUS[:SPLITS][@DIR] "
            f"with CORPUS one of {', '.join(PARALLEL_CORPORA)}"
        )
    splits, lines = tuple(s.strip() for s in split_list.split(",") if s.strip()), None
    if corpus == "sib200":
        splits = _check_sib_splits(splits or ("train", "dev"))
    elif colon and corpus in LINE_RANGE_CORPORA:
        match = re.fullmatch(r"\s*(\d+)-(\d+)\s*", split_list)
        if not match or int(match[2]) < int(match[1]):
            raise ValueError(f"{corpus} takes a pair range FIRST-LAST (0-based, inclusive) after ':', "
                             f"e.g. {corpus}:0-299; got {split_list!r} in {spec!r}")
        splits, lines = (), (int(match[1]), int(match[2]))
    elif colon:
        raise ValueError(f"{corpus} has no splits; drop ':{split_list}' from {spec!r}")
    if at and not folder.strip():
        raise ValueError(f"empty directory after '@' in {spec!r}")
    data_dir = Path(folder.strip()).expanduser() if at else _root(default_data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {data_dir} (from {spec!r}) does not exist")
    return ParallelSource(corpus, splits, data_dir, lines)
