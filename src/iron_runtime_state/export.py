"""Writing audit records out as JSONL or CSV, for both managers' ``export_audit_log``."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable
from typing import IO, Final

from .errors import StateTypeError, ValidationError
from .models import AuditRecord

__all__ = ["EXPORT_COLUMNS", "EXPORT_FORMATS", "check_export_format", "export_writer"]

EXPORT_FORMATS: Final = ("jsonl", "csv")
EXPORT_COLUMNS: Final = ("seq", "agent_id", "event_type", "timestamp", "details", "prev_hash", "hash")


def check_export_format(fmt: object) -> str:
    """``fmt`` if it is a known export format."""
    if fmt not in EXPORT_FORMATS:
        raise ValidationError(f"unknown export format {str(fmt)[:32]!r}; use 'jsonl' or 'csv'")
    return str(fmt)


def write_export(records: Iterable[AuditRecord], out: IO[str], fmt: str) -> int:
    """Write records to a text stream as JSONL or CSV; returns how many."""
    count = 0
    if fmt == "jsonl":
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        for record in records:
            out.write(dumps(record.to_dict()))
            out.write("\n")
            count += 1
    else:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
        for record in records:
            d = record.to_dict()
            writer.writerow([d[c] for c in EXPORT_COLUMNS])
            count += 1
    return count


def export_writer(file: str | os.PathLike[str] | IO[str], fmt: str) -> Callable[[Iterable[AuditRecord]], int]:
    """A function that writes records to ``file`` (a path, or a text file open for writing)."""
    if isinstance(file, (str, os.PathLike)):
        path = file

        def write_file(records: Iterable[AuditRecord]) -> int:
            with open(path, "w", encoding="utf-8", newline="") as out:
                return write_export(records, out, fmt)

        return write_file
    if not isinstance(file, io.TextIOBase) and not hasattr(file, "write"):
        raise StateTypeError("file must be a path or a text file opened for writing")
    out = file

    def write_stream(records: Iterable[AuditRecord]) -> int:
        return write_export(records, out, fmt)

    return write_stream
