"""Inputs that a training run replaced because they could not be read (damaged tiles, corrupt patches).

A source logs each bad input once per process; DataLoader workers and ranks are separate processes, so
each also appends a line to its own file under `<output_dir>/skipped/` (no locking, no interleaving), and
the end of the run sums them up in one message and logs the list to MLflow: a run that trained around
damaged data says so, instead of leaving a warning scrolled away in one worker's output.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Hashable
from pathlib import Path

log = logging.getLogger(__name__)

SKIPPED_DIR = "skipped"


class SkippedInputs:
    """What one process found unreadable: `note(key, name, error)` logs `name` the first time `key` is
    seen and, once `folder` is set (by the training loop), records it there too."""

    def __init__(self, kind: str):
        self.kind = kind  # what a key names, e.g. "slide" or "sample"
        self.keys: set[Hashable] = set()
        self.folder: Path | None = None

    def note(self, key: Hashable, name: str, error: BaseException | str) -> None:
        if key in self.keys:
            return
        self.keys.add(key)
        log.warning("skipping an unreadable %s (replaced by others): %s", self.kind, error)
        if self.folder is None:
            return
        line = json.dumps({"kind": self.kind, "name": str(name), "error": str(error), "time": time.time()}) + "\n"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.folder / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a") as f:
                f.write(line)
        except OSError as err:  # the record is a convenience; training goes on without it
            log.warning("could not record the skipped %s in %s: %s", self.kind, self.folder, err)


def read_skipped(folder: Path, since: float = 0.0) -> list[dict]:
    """Every input recorded under `folder` at or after time `since` (an earlier run's records stay in the
    folder), once each with its first error, in a stable order."""
    found: dict[tuple[str, str], dict] = {}
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                key, when = (entry["kind"], entry["name"]), float(entry["time"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a killed worker
            if when < since:
                continue
            found.setdefault(key, entry)
    return sorted(found.values(), key=lambda e: (e["kind"], e["name"]))


def summary(entries: list[dict], folder: Path, shown: int = 5) -> str:
    """One message for the end of a run: how many inputs of each kind were replaced, and the first few."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
    what = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items())
    lines = [f"training replaced unreadable inputs from {what} (all listed in {folder}):"]
    lines += [f"  {e['name']}: {e['error']}" for e in entries[:shown]]
    if len(entries) > shown:
        lines.append(f"  ... and {len(entries) - shown} more")
    return "\n".join(lines)
