"""Recording input (relay.record_input), the per-file size cap and retention, on real files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from relay.session.recording import Recording, RecordingOptions
from relay.session.recording_retention import expired_files


def _events(path: Path) -> list[list[Any]]:
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["version"] == 2
    return [json.loads(line) for line in lines[1:]]


def _record(tmp_path: Path, options: RecordingOptions, name: str) -> Path:
    rec = Recording.create(
        tmp_path, name, width=80, height=24, term="xterm", title="t", options=options
    )
    rec.output(b"$ ")
    rec.input(b"echo secret-typed\r")
    rec.output(b"echo secret-typed\r\nsecret-typed\r\n")
    rec.close()
    return rec.path


def test_input_is_recorded_only_when_asked(tmp_path: Path) -> None:
    """Default: only "o" events; with record_input the keystrokes are "i" events, in order."""
    off = _events(_record(tmp_path, RecordingOptions(), "off"))
    assert {kind for _, kind, _ in off} == {"o"}
    on = _events(_record(tmp_path, RecordingOptions(record_input=True), "on"))
    assert [kind for _, kind, _ in on] == ["o", "i", "o"]
    assert on[1][2] == "echo secret-typed\r"
    assert [t for t, _, _ in on] == sorted(t for t, _, _ in on)


def test_size_cap_stops_input_with_a_marker_and_keeps_output(tmp_path: Path) -> None:
    """Past recording_max_bytes no "i" event is written, one "m" marker says why, output goes on."""
    rec = Recording.create(
        tmp_path,
        "cap",
        width=80,
        height=24,
        term="xterm",
        title="t",
        options=RecordingOptions(record_input=True, max_bytes=2000),
    )
    for i in range(60):
        rec.input(f"typed-{i}\r".encode())
        rec.output(f"output line {i} ".encode() * 3 + b"\r\n")
        time.sleep(0.001)
    rec.close()
    events = _events(rec.path)
    kinds = [kind for _, kind, _ in events]
    assert kinds.count("m") == 1
    marker = kinds.index("m")
    assert "input recording stopped" in events[marker][2]
    assert "i" in kinds[:marker] and "i" not in kinds[marker:]
    assert "output line 59" in "".join(str(data) for _, kind, data in events if kind == "o")
    assert not rec.records_input


def test_expired_files_are_those_older_than_the_retention(tmp_path: Path) -> None:
    """Files last written before now - retention are expired; fresh ones are kept."""
    old, new = tmp_path / "old.cast", tmp_path / "new.cast"
    old.write_text("{}\n")
    new.write_text("{}\n")
    now = time.time()
    os.utime(old, (now - 3600, now - 3600))
    assert expired_files(tmp_path, 600, now) == [old]
