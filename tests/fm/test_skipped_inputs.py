"""The record of unreadable inputs that a run sums up at its end."""

import json
import time

from fm.skipped_inputs import SkippedInputs, read_skipped, summary


def test_each_input_is_recorded_once_per_process_and_only_this_runs_records_are_read(tmp_path, caplog):
    folder = tmp_path / "skipped"
    earlier = SkippedInputs("slide")
    earlier.folder = folder
    earlier.note(0, "/slides/old.svs", "an earlier run's error")
    time.sleep(0.01)
    since = time.time()

    skipped = SkippedInputs("slide")
    with caplog.at_level("WARNING", logger="fm.skipped_inputs"):
        skipped.note(1, "/slides/a.svs", OSError("read error at level 0"))
        skipped.note(1, "/slides/a.svs", OSError("the same slide again"))
    assert sum("a.svs" in r.getMessage() or "read error" in r.getMessage() for r in caplog.records) == 1
    skipped.folder = folder
    skipped.note(1, "/slides/a.svs", "seen before the folder was set: not recorded again in this process")
    skipped.note(2, "/slides/b.svs", "corrupt tile")
    other_worker = SkippedInputs("slide")
    other_worker.folder = folder
    other_worker.note(2, "/slides/b.svs", "found again by another worker")
    with open(next(folder.glob("*.jsonl")), "a") as f:
        f.write('{"kind": "slide", "name": "/slides/c.s')  # a line cut short by a killed worker

    entries = read_skipped(folder, since)
    assert [(e["name"], e["error"]) for e in entries] == [("/slides/b.svs", "corrupt tile")]
    assert [e["name"] for e in read_skipped(folder)] == ["/slides/b.svs", "/slides/old.svs"]
    text = summary(read_skipped(folder), folder, shown=1)
    assert "from 2 slides" in text and "/slides/b.svs: corrupt tile" in text and "and 1 more" in text
    assert "old.svs" not in text
    json.dumps(entries)  # the listing logged to MLflow is plain JSON


def test_a_folder_that_cannot_be_written_does_not_stop_training(tmp_path, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    skipped = SkippedInputs("sample")
    skipped.folder = blocked / "skipped"
    with caplog.at_level("WARNING", logger="fm.skipped_inputs"):
        skipped.note(3, "patch 3", "missing band file")
    assert skipped.keys == {3}
    assert any("could not record" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_sums_up_its_earlier_segments_too(tmp_path):
    """The summary at the end of a requeued or resumed run covers what was replaced before the requeue:
    the run's start is noted when it starts fresh and read back when it resumes."""
    from fm.train import _run_start

    folder = tmp_path / "skipped"
    first = _run_start(folder, resumed=False)
    before_requeue = SkippedInputs("slide")
    before_requeue.folder = folder
    before_requeue.note(0, "/slides/a.svs", "read error")
    time.sleep(0.01)
    assert _run_start(folder, resumed=True) == first
    assert [e["name"] for e in read_skipped(folder, _run_start(folder, resumed=True))] == ["/slides/a.svs"]
    assert read_skipped(folder, _run_start(folder, resumed=False)) == []  # a fresh run starts its own count
