"""Data loaders on the real shared data, plus tiny temporary files for the error cases.

Expected values are read straight from the files here (csv / plain splitting),
independently of lingosteer.data.
"""

import csv
import json
import random

import pytest

from lingosteer.data import (
    XNLI_LABELS,
    load_sib200,
    load_xcopa,
    load_ntrex,
    load_xnli,
    parallel_ntrex,
    parallel_sib200,
    parallel_tatoeba,
    parse_parallel_source,
)


def _sib_rows(path):
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _plain_lines(path):
    return path.read_bytes().decode("utf-8").replace("\r\n", "\n").rstrip("\n").split("\n")


# --- SIB-200 -----------------------------------------------------------------


def test_load_sib200_splits_and_codes(data_dir):
    rows = load_sib200("sw", ("train", "dev"), data_dir)
    assert len(rows) == 701 + 99
    first = _sib_rows(data_dir / "sib200" / "swh_Latn" / "train.tsv")[0]
    assert (rows[0].index_id, rows[0].category, rows[0].text) == (
        int(first["index_id"]), first["category"], first["text"])
    assert len(load_sib200("swh_Latn", "test", data_dir)) == 204
    # A FLORES code missing from the language table still names its folder.
    assert len(load_sib200("ace_Arab", ["dev"], data_dir)) == 99


def test_parallel_sib200_joins_on_index_id(data_dir):
    pairs = parallel_sib200("swh_Latn", "zh", ("train", "dev"), data_dir)
    sib200 = data_dir / "sib200"
    sw = {r["index_id"]: r["text"] for s in ("train", "dev") for r in _sib_rows(sib200 / "swh_Latn" / f"{s}.tsv")}
    zh = {r["index_id"]: r["text"] for s in ("train", "dev") for r in _sib_rows(sib200 / "zho_Hans" / f"{s}.tsv")}
    assert sorted(pairs) == sorted((sw[i], zh[i]) for i in sw)


def test_parallel_sib200_does_not_trust_row_order(tmp_path, data_dir):
    # The shared files list ids in the same order everywhere; shuffle one copy so
    # that pairing by position would give wrong pairs.
    for lang in ("eng_Latn", "fra_Latn"):
        (tmp_path / "sib200" / lang).mkdir(parents=True)
        lines = (data_dir / "sib200" / lang / "dev.tsv").read_text(encoding="utf-8").splitlines()
        body = lines[1:]
        if lang == "fra_Latn":
            random.Random(0).shuffle(body)
        (tmp_path / "sib200" / lang / "dev.tsv").write_text("\n".join([lines[0], *body]) + "\n", encoding="utf-8")
    shuffled = parallel_sib200("en", "fr", ["dev"], tmp_path)
    assert sorted(shuffled) == sorted(parallel_sib200("en", "fr", ["dev"], data_dir))
    # The corpus folder itself works as data_dir too.
    assert parallel_sib200("en", "fr", ["dev"], tmp_path / "sib200") == shuffled


def test_sib200_errors(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match=r"no SIB-200 folder for language 'xyz'.*205 available: ace_Arab"):
        load_sib200("xyz", data_dir=data_dir)
    with pytest.raises(ValueError, match="splits must be some of train, dev, test"):
        load_sib200("en", ("valid",), data_dir)
    folder = tmp_path / "sib200" / "eng_Latn"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_text("index_id\tcategory\ttext\n1\ttravel\tok\nnot-a-number\ttravel\tbad\n")
    with pytest.raises(ValueError, match=f"{folder / 'dev.tsv'}:3: expected"):
        load_sib200("en", ["dev"], tmp_path)


# --- NTREX-128 -----------------------------------------------------------------


def test_parallel_ntrex_is_line_aligned(data_dir):
    ntrex = data_dir / "ntrex128"
    pairs = parallel_ntrex("eng_Latn", "sw", data_dir)
    english = _plain_lines(ntrex / "newstest2019-src.eng.txt")
    swahili = _plain_lines(ntrex / "newstest2019-ref.swa.txt")
    assert len(pairs) == 1997
    assert pairs == list(zip(english, swahili))
    assert not any("\r" in s or "\r" in t for s, t in pairs)  # the files have CRLF endings
    assert load_ntrex("swa", data_dir) == swahili


def test_parallel_ntrex_variants_and_missing(data_dir):
    # A regional variant names its own file; the FLORES code gets the main one.
    brazil = parallel_ntrex("por-BR", "zho-TW", data_dir)
    assert brazil[5] == (_plain_lines(data_dir / "ntrex128" / "newstest2019-ref.por-BR.txt")[5],
                         _plain_lines(data_dir / "ntrex128" / "newstest2019-ref.zho-TW.txt")[5])
    portuguese = _plain_lines(data_dir / "ntrex128" / "newstest2019-ref.por.txt")
    assert parallel_ntrex("por_Latn", "en", data_dir)[5][0] == portuguese[5]
    with pytest.raises(FileNotFoundError, match=r"no NTREX-128 file for language 'quy'.*available"):
        parallel_ntrex("quy", "en", data_dir)


def test_ntrex_mismatched_lengths(tmp_path):
    (tmp_path / "newstest2019-src.eng.txt").write_text("a\nb\nc\n")
    (tmp_path / "newstest2019-ref.swa.txt").write_text("x\ny\n")
    with pytest.raises(ValueError, match="differ in length.*3 lines.*has 2"):
        parallel_ntrex("en", "sw", tmp_path)


# --- Tatoeba (LASER layout) -----------------------------------------------------


@pytest.fixture
def tatoeba_dir(tmp_path):
    folder = tmp_path / "tatoeba"
    folder.mkdir()
    (folder / "tatoeba.swh-eng.swh").write_text("Habari.\nAsante sana.\n", encoding="utf-8")
    (folder / "tatoeba.swh-eng.eng").write_text("Hello.\nThank you very much.\n", encoding="utf-8")
    (folder / "tatoeba.cmn-eng.cmn").write_text("你好。\n", encoding="utf-8")
    (folder / "tatoeba.cmn-eng.eng").write_text("Hello.\n", encoding="utf-8")
    return folder


def test_parallel_tatoeba(tatoeba_dir):
    expected = [("Habari.", "Hello."), ("Asante sana.", "Thank you very much.")]
    assert parallel_tatoeba("sw", tatoeba_dir) == expected
    assert parallel_tatoeba("swh", tatoeba_dir.parent) == expected  # data root holding tatoeba/
    assert parallel_tatoeba("zho_Hans", tatoeba_dir) == [("你好。", "Hello.")]  # LASER calls it cmn
    with pytest.raises(FileNotFoundError, match=r"tatoeba\.fra-eng\.fra.*available: cmn swh"):
        parallel_tatoeba("fr", tatoeba_dir)
    (tatoeba_dir / "tatoeba.swh-eng.eng").write_text("Hello.\n")
    with pytest.raises(ValueError, match="differ in length"):
        parallel_tatoeba("sw", tatoeba_dir)


# --- XCOPA ---------------------------------------------------------------------


def test_load_xcopa_all_languages(data_dir):
    files = sorted((data_dir / "xcopa").glob("val.*.jsonl"))
    assert len(files) == 11
    for path in files:
        raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        items = load_xcopa(path)
        assert [(i.premise, i.choice1, i.label, i.idx) for i in items] == [
            (r["premise"], r["choice1"], r["label"], r["idx"]) for r in raw
        ]
    # The English translations are row for row the same items.
    assert [i.idx for i in load_xcopa(data_dir / "xcopa" / "translated-en" / "val.sw.jsonl")] == [
        i.idx for i in load_xcopa(data_dir / "xcopa" / "val.sw.jsonl")
    ]
    assert len(load_xcopa(data_dir / "xcopa" / "train.en.jsonl")) == 400


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"premise": "p", "choice1": "a"', "not valid JSON"),
        ('{"premise": "p", "choice1": "a", "choice2": "b", "question": "effect", "label": 1}', "missing field"),
        ('{"premise": "p", "choice1": "a", "choice2": "b", "question": "effect", "label": "1", "idx": 0}',
         "wrong type"),
        ('{"premise": "p", "choice1": "a", "choice2": "b", "question": "why", "label": 1, "idx": 0}',
         "cause or effect"),
        ('{"premise": "p", "choice1": "a", "choice2": " ", "question": "cause", "label": 1, "idx": 0}',
         "empty choice2"),
    ],
)
def test_xcopa_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    good = '{"premise": "p", "choice1": "a", "choice2": "b", "question": "cause", "label": 0, "idx": 0}'
    path = tmp_path / "val.xx.jsonl"
    path.write_text(f"{good}\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:2: .*{message}"):
        load_xcopa(path)


# --- XNLI ----------------------------------------------------------------------


def test_xnli_tsv_and_jsonl_agree(tmp_path, data_dir):
    tsv = data_dir / "xnli" / "dev.en.tsv"
    rows = [line.split("\t") for line in _plain_lines(tsv)]
    as_int = {"entailment": 0, "neutral": 1, "contradiction": 2}  # the README's convention
    jsonl = tmp_path / "test.en.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"premise": p, "hypothesis": h, "label": as_int[label]}) + "\n" for p, h, label in rows),
        encoding="utf-8",
    )
    from_tsv, from_jsonl = load_xnli(tsv), load_xnli(jsonl)
    assert len(from_tsv) == 2490 and from_tsv == from_jsonl
    assert {item.label for item in from_tsv} == {0, 1, 2}
    assert [XNLI_LABELS[item.label] for item in from_tsv] == [label for _, _, label in rows]


XNLI_LANGUAGES = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")


def test_xnli_dev_files_of_all_15_languages_load(data_dir):
    paths = sorted((data_dir / "xnli").glob("dev.*.tsv"))
    assert [path.name for path in paths] == [f"dev.{language}.tsv" for language in XNLI_LANGUAGES]
    for path in paths:
        assert len(load_xnli(path)) == 2490, path


def test_xnli_malformed(tmp_path):
    tsv = tmp_path / "dev.xx.tsv"
    tsv.write_text("p\th\tneutral\np\th\tentailment\np\th\tmaybe\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{tsv}:3: expected"):
        load_xnli(tsv)
    tsv.write_text("p\th\tneutral\np\t\tentailment\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{tsv}:2: empty premise or hypothesis"):
        load_xnli(tsv)
    jsonl = tmp_path / "test.xx.jsonl"
    jsonl.write_text('{"premise": "p", "hypothesis": "h", "label": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=f"{jsonl}:1: label must be 0, 1 or 2"):
        load_xnli(jsonl)
    with pytest.raises(FileNotFoundError, match="missing.tsv not found"):
        load_xnli(tmp_path / "missing.tsv")


# --- parallel-source specs -------------------------------------------------------


def test_parse_parallel_source(data_dir, tatoeba_dir):
    sib = parse_parallel_source("sib200", default_data_dir=data_dir)
    assert sib.describe() == {"corpus": "sib200", "splits": ["train", "dev"], "data_dir": str(data_dir)}
    assert sib.pairs("sw", "en") == parallel_sib200("sw", "en", ("train", "dev"), data_dir)
    test = parse_parallel_source(f"sib200:test@{data_dir}")
    assert test.splits == ("test",) and len(test.pairs("et", "en")) == 204
    ntrex = parse_parallel_source(f"ntrex@{data_dir / 'ntrex128'}")
    assert ntrex.pairs("en", "de") == parallel_ntrex("en", "de", data_dir)
    tatoeba = parse_parallel_source(f"tatoeba@{tatoeba_dir}")
    assert tatoeba.pairs("sw", "en")[0] == ("Habari.", "Hello.")
    assert tatoeba.pairs("en", "sw")[0] == ("Hello.", "Habari.")
    with pytest.raises(ValueError, match="English only"):
        tatoeba.pairs("sw", "zh")
    news = parse_parallel_source(f"ntrex:10-19@{data_dir}")
    assert (news.describe()["lines"] == [10, 19]
            and news.pairs("sw", "en") == parallel_ntrex("sw", "en", data_dir)[10:20])
    with pytest.raises(ValueError, match="1997 swh_Latn-eng_Latn pairs; the range 0-1999"):
        parse_parallel_source(f"ntrex:0-1999@{data_dir}").pairs("swh_Latn", "eng_Latn")
    xcopa = parse_parallel_source(f"xcopa@{data_dir}").pairs("sw", "en")
    items = load_xcopa(data_dir / "xcopa" / "val.sw.jsonl")
    english = load_xcopa(data_dir / "xcopa" / "translated-en" / "val.sw.jsonl")
    assert len(xcopa) == 300 and xcopa[3:6] == list(zip(*[(i.premise, i.choice1, i.choice2)
                                                          for i in (items[1], english[1])]))
    with pytest.raises(FileNotFoundError, match="no English translation .*val.qu.jsonl"):
        parse_parallel_source(f"xcopa@{data_dir}").pairs("qu", "en")


def test_parallel_files_with_empty_lines_or_duplicate_pairs_are_refused(tmp_path):
    (tmp_path / "newstest2019-src.eng.txt").write_text("a\nb\nc\n")
    (tmp_path / "newstest2019-ref.swa.txt").write_text("x\n \nz\n")
    with pytest.raises(ValueError, match=r"newstest2019-ref.swa.txt:2: empty line"):
        parallel_ntrex("en", "sw", tmp_path)
    (tmp_path / "newstest2019-src.eng.txt").write_text("a\nb\na\n")
    (tmp_path / "newstest2019-ref.swa.txt").write_text("x\ny\nx\n")
    with pytest.raises(ValueError, match="pair 3 duplicates pair 1"):
        parallel_ntrex("en", "sw", tmp_path)


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("flores", ValueError, "unknown parallel corpus 'flores'"),
        ("sib200:valid", ValueError, "splits must be some of"),
        ("ntrex:train", ValueError, "pair range FIRST-LAST"),
        ("xcopa:9-3", ValueError, "pair range FIRST-LAST"),
        ("tatoeba:0-3", ValueError, "tatoeba has no splits"),
        ("sib200@", ValueError, "empty directory"),
        ("tatoeba@/no/such/dir", FileNotFoundError, "/no/such/dir"),
    ],
)
def test_parse_parallel_source_errors(spec, error, message):
    with pytest.raises(error, match=message):
        parse_parallel_source(spec)
