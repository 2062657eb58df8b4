import gzip
import json

import pytest

from training.data import DataError, load_files, read_catalogue


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


CAT = (
    "item_id\tdomain\ttitle\textra_text\n"
    "a\tFood\tDark roast coffee\t\n"
    "b\tFood\tGreen tea\tloose leaf\n"
    "c\tKitchen\tSteel pan\t\n"
    'd\tKitchen\t"Chef knife, 8"""\t\n'
)


def test_valid_files_and_time_order(tmp_path):
    cat = _write(tmp_path / "items.tsv", CAT)
    inter = _write(
        tmp_path / "inter.csv",
        "user_id,item_id,domain,timestamp\n"
        "u1,c,Kitchen,30\nu1,a,Food,10\nu1,b,,20\nu1,d,Kitchen,40\nu2,a,Food,1\n",
    )
    d = load_files(cat, inter)
    assert d.data.items[3].title == 'Chef knife, 8"'  # CSV quoting honoured
    assert d.extra_text[1] == "loose leaf"
    ext = d.external_ids
    u1 = [s for s in d.data.train if s.user_id == "u1"][0]
    assert [ext[i] for i in u1.item_ids] == ["a", "b"]  # sorted by timestamp, LOO split
    assert [ext[d.data.test[0].target]] == ["d"] and [ext[d.data.valid[0].target]] == ["c"]
    assert d.stats["bad_rows"] == {"catalogue": 0, "interactions": 0}


def test_bad_rows_reported_as_file_line(tmp_path):
    cat = _write(tmp_path / "items.tsv", CAT + "a\tFood\tdup\t\n\tFood\tno id\t\ne\tFood\t   \t\n")
    with pytest.raises(DataError) as err:
        read_catalogue(cat)
    msg = str(err.value)
    assert f"{cat}:6: duplicate item_id 'a' (first at line 2)" in msg
    assert f"{cat}:7: empty item_id" in msg
    assert f"{cat}:8: empty title" in msg
    assert "--skip-bad-rows" in msg
    assert len(err.value.bad_rows) == 3


def test_interaction_errors_and_skip_counts(tmp_path):
    cat = _write(tmp_path / "items.tsv", CAT)
    rows = [
        {"user_id": "u1", "item_id": "a", "position": 0},
        {"user_id": "u1", "item_id": "zzz", "position": 1},  # line 2: unknown item
        {"user_id": "u1", "item_id": "c", "domain": "Food"},  # line 3: wrong domain
        {"user_id": "", "item_id": "b"},  # line 4: empty user
        {"user_id": "u1", "item_id": "b", "position": "soon"},
    ]  # line 5: not a number
    inter = tmp_path / "inter.jsonl.gz"
    with gzip.open(inter, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        fh.write("{not json\n")  # line 6
    with pytest.raises(DataError) as err:
        load_files(cat, inter)
    msg = str(err.value)
    for line, reason in [
        (2, "is not in the catalogue"),
        (3, "differs from the catalogue"),
        (4, "empty user_id"),
        (5, "must be a number"),
        (6, "invalid JSON"),
    ]:
        assert f"{inter}:{line}: " in msg and reason in msg
    d = load_files(cat, inter, skip_bad_rows=True)
    assert d.stats["bad_rows"]["interactions"] == 5
    assert d.stats["interactions"] == 1


def test_csv_ragged_row(tmp_path):
    cat = _write(tmp_path / "items.csv", "item_id,domain,title\na,Food,Tea\nb,Food,Milk,extra\n")
    with pytest.raises(DataError, match=r"items.csv:3: more fields than the header"):
        read_catalogue(cat)
    assert read_catalogue(cat, skip_bad_rows=True).bad_rows == 1
