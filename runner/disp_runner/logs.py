"""What `disp` prints on stderr besides its one result or error line.

The runner's own warnings (a lease it waits for, a setting it adjusts) are printed as
`disp: warning: ...` lines. Everything the libraries underneath say — Python warnings from Pillow,
torch or transformers, transformers' load reports, urllib3's retries — is kept out of a user's
terminal and of a pod's log, where it would come before, and bury, the one line that says what went
wrong; `--debug` (or DISP_LOG_LEVEL=debug) shows all of it."""

from __future__ import annotations

import logging
import os
import sys
import warnings

OWN_LOGGERS = ("disp_runner", "disp_operator", "disp_api")
LEVEL_VARIABLE = "DISP_LOG_LEVEL"


class _OwnWarningsOnly(logging.Filter):
    def __init__(self, everything: bool):
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        return self.everything or record.name.split(".")[0] in OWN_LOGGERS


def configure(debug: bool = False) -> None:
    """Route every library's warnings through logging, and print only the runner's own (unless debug)."""
    everything = debug or os.environ.get(LEVEL_VARIABLE, "").strip().lower() == "debug"
    logging.captureWarnings(True)  # warnings.warn(...) becomes a record of the "py.warnings" logger
    warnings.simplefilter("default")  # each distinct warning once, as a record
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s" if everything
                                           else "disp: warning: %(message)s"))
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
