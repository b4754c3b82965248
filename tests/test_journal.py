import json

from pipeline.core.fsutil import JsonLinesWriter
from pipeline.formats.journal import (
    UNKNOWN,
    JournalIndex,
    final_codes,
    is_final,
    outcome_of,
    read_journal,
)


def test_torn_last_line_is_skipped_and_next_record_starts_on_a_new_line(tmp_path):
    path = tmp_path / "gather.jsonl"
    with JsonLinesWriter(path) as journal:
        journal.write({"id": "a", "outcome": "ok", "final": True})
    with open(path, "a") as handle:
        handle.write('{"id": "b", "outc')  # a kill -9 in the middle of a write
    with JsonLinesWriter(path) as journal:
        journal.write({"id": "c", "outcome": "timeout", "final": False})
    records = read_journal(path)
    assert sorted(records) == ["a", "c"]
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()
            if line.endswith("}")] == ["a", "c"]


def test_last_record_of_an_id_wins_and_finality_decides_resume(tmp_path):
    path = tmp_path / "gather.jsonl"
    with JsonLinesWriter(path) as journal:
        journal.write({"id": "a", "outcome": "timeout", "final": False})
        journal.write({"id": "a", "outcome": "ok", "final": True})
    records = read_journal(path)
    assert records["a"]["outcome"] == "ok"
    assert is_final(records["a"])
    assert not is_final({"outcome": "http_error", "final": False})
    assert not is_final({"outcome": "timeout"})
    assert is_final({"outcome": "dead"})


def test_the_index_holds_each_ids_last_outcome_and_reads_whole_records_back(tmp_path):
    path = tmp_path / "gather.jsonl"
    with JsonLinesWriter(path) as journal:
        journal.write({"id": "a", "outcome": "timeout", "final": False})
        journal.write({"id": "b", "outcome": "ok", "final": True, "sha256": "x"})
        journal.write({"id": "a", "outcome": "ok", "final": True, "sha256": "y"})
        journal.write({"id": "c", "outcome": "http_error", "final": False})
        journal.write({"id": "b", "outcome": "placeholder", "final": True})
        journal.write({"id": "d", "outcome": "duplicate"})  # an old record: no `final`
    with open(path, "a") as handle:
        handle.write('{"id": "e", "outc')  # a torn tail
    index = JournalIndex.read(path)
    assert len(index) == 4
    assert [index.outcome(i) for i in "abcde"] == ["ok", "placeholder", "http_error",
                                                    "duplicate", None]
    codes = index.lookup(["a", "b", "c", "d", "e", "nowhere"])
    assert final_codes(codes).tolist() == [True, True, False, True, False, False]
    assert outcome_of(int(codes[4])) is None and codes[4] == UNKNOWN
    back = [record for _, record in index.last_records(path, frozenset({"ok", "duplicate"}))]
    assert [(r["id"], r.get("sha256")) for r in back] == [("a", "y"), ("d", None)]
    assert len(JournalIndex.read(tmp_path / "none.jsonl")) == 0


def test_the_index_takes_17_bytes_per_id(tmp_path):
    path = tmp_path / "gather.jsonl"
    with JsonLinesWriter(path) as journal:
        for k in range(5000):
            journal.write({"id": f"n1_{k}", "outcome": "unreachable", "final": False})
    index = JournalIndex.read(path)
    assert index.keys.nbytes + index.codes.nbytes + index.offsets.nbytes == 17 * 5000
