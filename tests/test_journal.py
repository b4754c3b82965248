import json

from pipeline.fsutil import JsonLinesWriter
from pipeline.journal import is_final, read_journal


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
