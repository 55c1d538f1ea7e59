"""The records an evaluation reads back: this run's and earlier runs' (same identity) from --out or
memory, and predictions files scored without a model."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmcli.errors import VlmError
from vlmcli.tasks.eval.data import read_json, read_jsonl_records
from vlmcli.tasks.resume import Record, ResumeIndex, ResumePlan, identity_matches, record_abspath
from vlmcli.tasks.sinks import JsonlSink, Sink, read_jsonl


class MemorySink(Sink):
    """Records kept in memory (no --out)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write_batch(self, records: list[Record]) -> None:
        self.records += [dict(r) for r in records]


class CountingSink(Sink):
    """Another sink, counting the answers of the records this run writes (VQA: questions run)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.answers = 0
        self.resumable = sink.resumable

    def open(self, plan: ResumePlan, with_hash: bool) -> ResumeIndex:
        return self.sink.open(plan, with_hash)

    def write_batch(self, records: list[Record]) -> None:
        self.answers += sum(len(r.get("answers") or []) for r in records if not r.get("error"))
        self.sink.write_batch(records)

    def close(self) -> None:
        self.sink.close()


def open_sink(out: Path | None) -> tuple[Sink, MemorySink | None]:
    """The run's sink: --out's JSONL file, or memory (also returned, to read the records back)."""
    if out is None:
        mem = MemorySink()
        return mem, mem
    return JsonlSink(out), None


def records_for(
    identity: dict[str, Any], inputs: Sequence[str], out: Path | None, memory: MemorySink | None
) -> dict[str, Record]:
    """abspath -> this task's record for each input (the file's, which includes earlier runs')."""
    wanted = {os.path.abspath(p) for p in inputs}
    source = read_jsonl(out) if out is not None and out.exists() else (memory.records if memory else [])
    found: dict[str, Record] = {}
    for r in source:
        if identity_matches(r, identity):
            ap = record_abspath(r)
            if ap in wanted:
                found[ap] = r
    return found


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """An official results JSON (a list of objects) or JSON lines (vlm's own --out records included)."""
    if path.suffix.lower() == ".jsonl":
        return [obj for _, obj in read_jsonl_records(path)]
    doc = read_json(path)
    if not isinstance(doc, list):
        raise VlmError("expected a JSON list of predictions (or a .jsonl file)", path)
    for i, d in enumerate(doc):
        if not isinstance(d, dict):
            raise VlmError(f"[{i}]: expected an object, got {type(d).__name__}", path)
    return doc
