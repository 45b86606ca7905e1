"""The language table: code lookups, coverage of the data sets, error messages."""

import csv

import pytest

from lingosteer.languages import (
    LANGUAGES_TSV,
    UnknownLanguageError,
    _index,
    all_languages,
    get_language,
    normalize_code,
    read_language_table,
)
from lingosteer import REPO_ROOT

PAPER_TABLE = REPO_ROOT.parent / "shared" / "reference" / "languages-paper.tsv"

# From the task: the FLORES-200 code of each XCOPA / XNLI language code.
XCOPA = {
    "et": "est_Latn", "ht": "hat_Latn", "id": "ind_Latn", "it": "ita_Latn", "qu": "quy_Latn", "sw": "swh_Latn",
    "ta": "tam_Taml", "th": "tha_Thai", "tr": "tur_Latn", "vi": "vie_Latn", "zh": "zho_Hans",
}
XNLI = {
    "ar": "arb_Arab", "bg": "bul_Cyrl", "de": "deu_Latn", "el": "ell_Grek", "en": "eng_Latn", "es": "spa_Latn",
    "fr": "fra_Latn", "hi": "hin_Deva", "ru": "rus_Cyrl", "sw": "swh_Latn", "th": "tha_Thai", "tr": "tur_Latn",
    "ur": "urd_Arab", "vi": "vie_Latn", "zh": "zho_Hans",
}


@pytest.mark.parametrize(
    "code, flores",
    [
        ("swh_Latn", "swh_Latn"), ("sw", "swh_Latn"), ("SW", "swh_Latn"), ("swh", "swh_Latn"),
        ("swa", "swh_Latn"),  # macro-language and NTREX file code
        ("zho-CN", "zho_Hans"), ("ZHO-tw", "zho_Hant"), ("zh", "zho_Hans"), ("cmn", "zho_Hans"),
        ("eng-US", "eng_Latn"), ("eng-gb", "eng_Latn"), ("en", "eng_Latn"),
        ("srp-Latn", "srp_Latn"), ("srp-Cyrl", "srp_Cyrl"), ("sr", "srp_Cyrl"),
        ("aze-Latn", "azj_Latn"), ("fas", "pes_Arab"), ("lav", "lvs_Latn"), ("fil", "tgl_Latn"),
        ("  de ", "deu_Latn"),
    ],
)
def test_any_known_code_resolves(code, flores):
    assert normalize_code(code) == flores
    assert get_language(code) is get_language(flores)


def test_language_fields():
    sw = get_language("sw")
    assert (sw.flores, sw.iso639_1, sw.iso639_3, sw.name, sw.script) == ("swh_Latn", "sw", "swh", "Swahili", "Latin")
    assert sw.resource == "High" and sw.in_flores200 and sw.ntrex == "swa" and sw.tatoeba_code == "swh"
    assert get_language("zh").tatoeba_code == "cmn"


@pytest.mark.parametrize("table, name", [(XCOPA, "XCOPA"), (XNLI, "XNLI")])
def test_benchmark_codes_resolve_to_flores(table, name, data_dir):
    for code, flores in table.items():
        assert normalize_code(code) == flores, (name, code)
        assert (data_dir / "sib200" / flores).is_dir(), (name, code)
    pattern = {"XCOPA": "xcopa/val.*.jsonl", "XNLI": "xnli/dev.*.tsv"}[name]
    assert {p.name.split(".")[1] for p in data_dir.glob(pattern)} == set(table)


def test_every_ntrex_language_resolves(data_dir):
    codes = [line.split()[0] for line in (data_dir / "ntrex128" / "LANGUAGES.tsv").read_text().splitlines()]
    files = {p.name.split(".")[1] for p in (data_dir / "ntrex128").glob("newstest2019-ref.*.txt")}
    assert files <= set(codes) and len(files) == 127  # LANGUAGES.tsv also names gsw-BE/ZH, absent here
    for code in codes:
        lang = get_language(code)
        # The row's NTREX file is this code, or the code is a regional variant alias.
        assert lang.ntrex == code or code in lang.aliases, code


def test_in_flores200_matches_sib200_folders(data_dir):
    folders = {p.name for p in (data_dir / "sib200").iterdir() if p.is_dir()}
    for lang in all_languages():
        assert lang.in_flores200 == (lang.flores in folders), lang.flores


def test_paper_languages_kept():
    with PAPER_TABLE.open(encoding="utf-8") as f:
        paper = list(csv.DictReader(f, delimiter="\t"))
    assert len(paper) == 89
    for row in paper:
        lang = get_language(row["code"])
        assert (lang.name, lang.script, lang.resource) == (row["name"], row["script"], row["nllb_resource"])


def test_table_is_sorted_and_unique():
    codes = [lang.flores for lang in all_languages()]
    assert codes == sorted(codes) and len(set(codes)) == len(codes)


def test_unknown_code_names_closest():
    with pytest.raises(UnknownLanguageError, match=r"unknown language code 'swh_latn'; did you mean swh_Latn"):
        get_language("swh_latn")
    with pytest.raises(ValueError, match="did you mean swh_Latn"):
        normalize_code("swahili")  # names only suggest
    with pytest.raises(UnknownLanguageError) as info:
        get_language("qq")
    assert "did you mean" not in str(info.value)


def _write_table(tmp_path, rows):
    path = tmp_path / "languages.tsv"
    header = LANGUAGES_TSV.read_text(encoding="utf-8").splitlines()[0]
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_table_errors(tmp_path):
    good = "aaa_Latn\taa\taaa\tA\tLatin\tX\t\tno\t\t\t"
    shared_iso = "aaa_Cyrl\taa\taaa\tA\tCyrillic\tX\t\tno\t\t\t"
    index = _index(read_language_table(_write_table(tmp_path, [good, shared_iso])))
    assert index.by_other_code["aa"].flores == "aaa_Latn"
    alias_hides_iso = "bbb_Latn\t\tbbb\tB\tLatin\tX\t\tno\t\t\taaa"
    with pytest.raises(ValueError, match="'aaa' names both bbb_Latn and aaa_Latn"):
        _index(read_language_table(_write_table(tmp_path, [good, alias_hides_iso])))
    double = "ccc_Latn\t\tccc\tC\tLatin\tX\t\tno\tzz\t\tzz-1"
    twice = "ddd_Latn\t\tddd\tD\tLatin\tX\t\tno\t\t\tZZ"
    with pytest.raises(ValueError, match="'zz' names both ccc_Latn and ddd_Latn"):
        _index(read_language_table(_write_table(tmp_path, [double, twice])))
    path = _write_table(tmp_path, [good.replace("\tno\t", "\tmaybe\t")])
    with pytest.raises(ValueError, match=f"{path}:2: in_flores200"):
        read_language_table(path)
