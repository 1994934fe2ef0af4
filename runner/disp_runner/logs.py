"""What `disp` prints on stderr besides its one result or error line, and how every line is written.

The runner's own warnings (a lease it waits for, a setting it adjusts) are printed as
`disp: warning: ...` lines. Everything the libraries underneath say — Python warnings from Pillow,
torch or transformers, transformers' load reports, urllib3's retries — is kept out of a user's
terminal and of a pod's log, where it would come before, and bury, the one line that says what went
wrong; `--debug` (or DISP_LOG_LEVEL=debug) shows all of it.

`disp run --log-format json` writes every line — progress, outcomes, warnings, the error — as one
JSON object (time, level, message, and the job, namespace, stage and shard it concerns), so a log
pipeline can filter a pod's log by job and stage; `say` is the one way the runner writes a line."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from datetime import datetime, timezone
from typing import Any

from disp_api import LogFormat

OWN_LOGGERS = ("disp_runner", "disp_store", "disp_operator", "disp_api")
LEVEL_VARIABLE = "DISP_LOG_LEVEL"


class _OwnWarningsOnly(logging.Filter):
    def __init__(self, everything: bool):
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        return self.everything or record.name.split(".")[0] in OWN_LOGGERS


_format = LogFormat.TEXT
_context: dict[str, Any] = {}


def set_format(log_format: LogFormat) -> None:
    global _format
    _format = log_format
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_disp_handler", False):
            handler.setFormatter(_JsonFormatter() if log_format is LogFormat.JSON else handler._disp_text_format)


def set_context(**fields: Any) -> None:
    """Fields every JSON line carries from now on (job, namespace, stage, shard); None removes one."""
    for key, value in fields.items():
        if value is None:
            _context.pop(key, None)
        else:
            _context[key] = value


def record(level: str, message: str, logger: str = "disp", **fields: Any) -> str:
    """One JSON log line."""
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "level": level,
             "logger": logger, "message": message, **_context}
    entry.update({key: value for key, value in fields.items() if value is not None})
    return json.dumps(entry, default=str)


def say(message: str, level: str = "info", text: str | None = None, **fields: Any) -> None:
    """Write one line: `text` (default: `message`) for people, or with --log-format json a JSON
    object holding `message` and `fields` (figures a pipeline may filter on). Warnings and errors
    go to stderr, the rest to stdout."""
    stream = sys.stderr if level in ("warning", "error") else sys.stdout
    line = record(level, message, **fields) if _format is LogFormat.JSON else (message if text is None else text)
    print(line, file=stream, flush=True)


class _JsonFormatter(logging.Formatter):
    def format(self, entry: logging.LogRecord) -> str:
        return record(entry.levelname.lower(), entry.getMessage(), logger=entry.name)


def configure(debug: bool = False) -> None:
    """Route every library's warnings through logging, and print only the runner's own (unless debug)."""
    everything = debug or os.environ.get(LEVEL_VARIABLE, "").strip().lower() == "debug"
    logging.captureWarnings(True)  # warnings.warn(...) becomes a record of the "py.warnings" logger
    warnings.simplefilter("default")  # each distinct warning once, as a record
    handler = logging.StreamHandler(sys.stderr)
    handler._disp_text_format = logging.Formatter("%(name)s: %(levelname)s: %(message)s" if everything  # type: ignore[attr-defined]
                                                  else "disp: warning: %(message)s")
    handler.setFormatter(_JsonFormatter() if _format is LogFormat.JSON else handler._disp_text_format)  # type: ignore[attr-defined]
    handler.addFilter(_OwnWarningsOnly(everything))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_disp_handler", False):
            root.removeHandler(old)
    handler._disp_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if everything else logging.WARNING)
    try:  # transformers prints through its own handler unless told to propagate to the root's
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        hf_logging.set_verbosity(logging.DEBUG if everything else logging.WARNING)
    except ImportError:
        pass
