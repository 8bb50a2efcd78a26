"""The JSONL log of a search: a config line, then one line per true evaluation (append-only).
Re-running a search with its log replays the logged scores and evaluates only what is missing."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..samplers.usf import SolverSpec

__all__ = ["SearchLog", "PHASES"]

PHASES = ("calib", "verify")


class SearchLog:
    """Append-only JSONL: a config line, then one line per true evaluation.  Reading it back skips an
    incomplete last line (a write the interrupted run did not finish; it is cut off, with a warning);
    any other damage is an error naming the file and line."""

    def __init__(self, path, config: dict, readonly: bool = False):
        self.path = Path(path) if path is not None else None
        self.readonly = readonly  # another rank's view: replays the log, never writes it
        self.cache: dict[tuple[str, str], float] = {}
        if self.path is None:
            return
        records = _read_log(self.path, readonly) if self.path.exists() else []
        if records:
            _check_config(self.path, records[0][1], config)
            for _, rec in records[1:]:
                self.cache[(rec["phase"], rec["key"])] = math.inf if rec["score"] is None else float(rec["score"])
        elif not readonly:  # a new log (or one whose only line was cut off while being written)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"type": "config", "config": config})

    def _append(self, rec: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    def record(self, phase: str, sp: SolverSpec, score: float, seconds: float) -> None:
        self.cache[(phase, sp.key())] = score
        if self.path is not None and not self.readonly:
            self._append({"type": "eval", "phase": phase, "key": sp.key(), "score": score if math.isfinite(score) else None,
                          "seconds": round(seconds, 4), "plan": sp.to_dict()})


def _read_log(path: Path, readonly: bool = False) -> list[tuple[int, dict]]:
    """(line number, record) of every line of a search log, checked; then the file ends with a newline."""
    text = path.read_text(errors="replace")
    *lines, tail = text.split("\n")  # tail: what follows the last newline ('' for a complete file)
    records = [(i, _parse_line(path, i, line)) for i, line in enumerate(lines, 1) if line.strip()]
    partial = False
    if tail.strip():
        try:
            records.append((len(lines) + 1, _parse_line(path, len(lines) + 1, tail)))
        except ValueError:
            partial = True
    for k, (i, rec) in enumerate(records):
        _check_record(path, i, rec, first=k == 0)
    if readonly:
        return records
    if partial:
        _cut_partial_line(path, text, tail, len(lines) + 1)
    elif tail.strip():  # a complete last record without its newline: end the line before appending
        with path.open("a") as f:
            f.write("\n")
    return records


def _parse_line(path: Path, i: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {i}: not valid JSON ({e.msg}, column {e.colno}); "
                         "the log is damaged: repair that line or use a new log file") from None


def _cut_partial_line(path: Path, text: str, tail: str, i: int) -> None:
    keep = len(text[: len(text) - len(tail)].encode())
    with path.open("r+b") as f:
        f.truncate(keep)
    warnings.warn(f"{path}, line {i}: incomplete last line (an interrupted write) dropped; "
                  "its evaluation will be redone", stacklevel=4)


def _check_record(path: Path, i: int, rec, first: bool) -> None:
    where = f"{path}, line {i}"
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    kind = rec.get("type")
    if first:
        if kind != "config" or not isinstance(rec.get("config"), dict):
            raise ValueError(f"{path} is not a search log (line {i} is not a config line)")
        return
    if kind != "eval":
        what = "a second config line" if kind == "config" else f"unknown record type {kind!r}"
        raise ValueError(f"{where}: {what} (allowed after line 1: 'eval')")
    for name in ("phase", "key", "score"):
        if name not in rec:
            raise ValueError(f"{where}: eval record missing {name!r} (has {', '.join(map(repr, rec))})")
    if rec["phase"] not in PHASES:
        raise ValueError(f"{where}: 'phase' must be one of {PHASES}, got {rec['phase']!r}")
    if not isinstance(rec["key"], str):
        raise ValueError(f"{where}: 'key' must be a string, got {rec['key']!r}")
    score = rec["score"]
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise ValueError(f"{where}: 'score' must be a number or null, got {score!r}")


def _check_config(path: Path, rec: dict, config: dict) -> None:
    old = rec["config"]
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k) and k != "budget")
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} vs {config.get(k)!r}" for k in diff)
        raise ValueError(f"{path} was written by a different search (line 1, logged vs now: {changes}); "
                         "use a new log file")
