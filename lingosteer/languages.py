"""The language table: one row per language, every code a dataset uses for it.

`configs/languages.tsv` is the single mapping between the code systems of the
data sets: FLORES-200 (`swh_Latn`, the project's canonical code), ISO 639-1
(`sw`, XCOPA/XNLI), ISO 639-3 (`swh`), NTREX-128 file codes (`swa`, `zho-CN`),
LASER Tatoeba file codes (`cmn`) and extra aliases (macro-languages such as
`swa`, regional variants such as `eng-US`).

Columns: flores, iso639_1, iso639_3, name, script, family, nllb_resource
(High/Low as in the NLLB paper, empty if not known), in_flores200 (yes/no: a
few NTREX-128 languages are not in FLORES-200; they get a code of the same
`lang_Scrp` form), ntrex (NTREX-128 file code), tatoeba (LASER Tatoeba file
code, empty when it is the ISO 639-3 code), aliases (comma-separated).

Lookup rules: FLORES codes match exactly (`swh_latn` is unknown, with a
suggestion); all other codes match case-insensitively. FLORES, NTREX, Tatoeba
and alias codes must each name one row. ISO codes may be shared (`zh` is both
`zho_Hans` and `zho_Hant`, `sr` both Serbian scripts): they resolve to the first
such row in the table, which is sorted by FLORES code so that the default
script (`Hans`, `Cyrl`) comes first.
"""

from __future__ import annotations

import csv
import difflib
import functools
from dataclasses import dataclass
from pathlib import Path

from lingosteer import config_path

LANGUAGES_TSV = config_path("languages.tsv")

COLUMNS = (
    "flores", "iso639_1", "iso639_3", "name", "script", "family",
    "nllb_resource", "in_flores200", "ntrex", "tatoeba", "aliases",
)


class UnknownLanguageError(ValueError):
    """A language code that the table does not know."""


@dataclass(frozen=True)
class Language:
    flores: str
    iso639_1: str  # "" if the language has none
    iso639_3: str
    name: str
    script: str
    family: str
    resource: str  # NLLB resource level: "High", "Low" or "" (unknown)
    in_flores200: bool
    ntrex: str  # NTREX-128 file code, "" if NTREX lacks the language
    tatoeba: str  # LASER Tatoeba file code if not the ISO 639-3 code, else ""
    aliases: tuple[str, ...] = ()

    @property
    def tatoeba_code(self) -> str:
        """The `xx` of LASER's `tatoeba.xx-eng.xx` files."""
        return self.tatoeba or self.iso639_3

    @property
    def exclusive_codes(self) -> tuple[str, ...]:
        """Codes that must name this language and no other (all but ISO codes)."""
        return tuple(c for c in (self.ntrex, self.tatoeba, *self.aliases) if c)


@dataclass(frozen=True)
class _Table:
    languages: tuple[Language, ...]
    by_flores: dict[str, Language]
    by_other_code: dict[str, Language]  # lower-cased ISO/NTREX/Tatoeba/alias codes


def _parse_row(row: dict[str, str], where: str) -> Language:
    if row["in_flores200"] not in ("yes", "no"):
        raise ValueError(f"{where}: in_flores200 must be yes or no, got {row['in_flores200']!r}")
    if not row["flores"] or not row["iso639_3"]:
        raise ValueError(f"{where}: flores and iso639_3 must not be empty")
    return Language(
        flores=row["flores"],
        iso639_1=row["iso639_1"],
        iso639_3=row["iso639_3"],
        name=row["name"],
        script=row["script"],
        family=row["family"],
        resource=row["nllb_resource"],
        in_flores200=row["in_flores200"] == "yes",
        ntrex=row["ntrex"],
        tatoeba=row["tatoeba"],
        aliases=tuple(a.strip() for a in row["aliases"].split(",") if a.strip()),
    )


def read_language_table(path: Path | str = LANGUAGES_TSV) -> tuple[Language, ...]:
    """Parse a languages TSV (the format of configs/languages.tsv)."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: header must be the columns {COLUMNS}, got {reader.fieldnames}")
        return tuple(_parse_row(row, f"{path}:{reader.line_num}") for row in reader)


def _exclusive_lower(lang: Language) -> set[str]:
    return {c.lower() for c in lang.exclusive_codes}


def _index(languages: tuple[Language, ...]) -> _Table:
    by_flores: dict[str, Language] = {}
    by_other_code: dict[str, Language] = {}
    for lang in languages:
        if lang.flores in by_flores:
            raise ValueError(f"languages table: duplicate FLORES code {lang.flores}")
        by_flores[lang.flores] = lang
    for lang in languages:
        for code in _exclusive_lower(lang):
            other = by_other_code.get(code)
            if other is not None and other is not lang:
                raise ValueError(f"languages table: code {code!r} names both {other.flores} and {lang.flores}")
            by_other_code[code] = lang
    for lang in languages:
        for code in filter(None, (lang.iso639_1.lower(), lang.iso639_3.lower())):
            other = by_other_code.setdefault(code, lang)  # a shared ISO code: first row wins
            if other is not lang and code in _exclusive_lower(other):
                raise ValueError(f"languages table: code {code!r} names both {other.flores} and {lang.flores}")
    return _Table(languages, by_flores, by_other_code)


@functools.cache
def _table() -> _Table:
    return _index(read_language_table())


def all_languages() -> tuple[Language, ...]:
    """Every language of the table, sorted by FLORES code."""
    return _table().languages


def _suggestion(code: str, table: _Table) -> str:
    # Lower-cased comparison so that `SWH_latn` still finds `swh_Latn`; language
    # names too, so that `swahili` finds it. Names only suggest, they never resolve.
    known: dict[str, str] = {}
    for lang in reversed(table.languages):  # reversed: the first row wins a shared name
        known[lang.name.lower()] = lang.flores
    known |= {c.lower(): c for c in table.by_other_code} | {c.lower(): c for c in table.by_flores}
    close = dict.fromkeys(known[c] for c in difflib.get_close_matches(code.lower(), known, n=3, cutoff=0.6))
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return hint + (
        " (FLORES-200 codes like swh_Latn are case-sensitive, ISO 639-1/3, NTREX and alias codes"
        " are not; the table is configs/languages.tsv)"
    )


def get_language(code: str) -> Language:
    """The language named by any known code (FLORES-200, ISO 639-1/3, NTREX, Tatoeba, alias)."""
    table = _table()
    code = code.strip()
    lang = table.by_flores.get(code) or table.by_other_code.get(code.lower())
    if lang is None:
        raise UnknownLanguageError(f"unknown language code {code!r}{_suggestion(code, table)}")
    return lang


def normalize_code(code: str) -> str:
    """The FLORES-200 code of any known language code: `sw` -> `swh_Latn`."""
    return get_language(code).flores
