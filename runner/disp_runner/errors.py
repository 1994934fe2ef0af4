"""Error types whose class decides how the CLI (and later the operator) reacts.

A `UserInputError` is a mistake in what the user handed us (a file, a flag, a manifest field):
the CLI prints its one-line message and exits with `EXIT_USER_ERROR`, never a traceback.
Anything else is a bug or an environment failure: the CLI prints one line (the traceback only with
`disp --debug`) and exits with `EXIT_TRANSIENT_ERROR` for a failing environment (disk full, out of
memory), `EXIT_INTERNAL_ERROR` for a bug.
"""

from __future__ import annotations


from disp_api.contract import ExitCode
from disp_runner import logs
# The base classes live with the store, which the operator shares without importing the runner.
from disp_store.errors import TransientError, UserInputError

__all__ = ["UserInputError", "TransientError", "UnsafeModelFormatError", "DegenerateResultError",
           "WeakBackdoorError", "NotVerifiedError", "warn_user"]

# The exit codes are the operator's contract (disp_api.contract): it treats EXIT_USER_ERROR as
# permanent (retrying a bad input cannot help) and EXIT_TRANSIENT_ERROR as worth a retry.
EXIT_OK = ExitCode.OK
EXIT_USER_ERROR = ExitCode.USER_ERROR
EXIT_TRANSIENT_ERROR = ExitCode.TRANSIENT_ERROR
EXIT_INTERNAL_ERROR = ExitCode.INTERNAL_ERROR
EXIT_WEAK_BACKDOOR = ExitCode.WEAK_BACKDOOR
EXIT_NOT_VERIFIED = ExitCode.NOT_VERIFIED


class UnsafeModelFormatError(UserInputError):
    """A model folder holds only pickle-based weights and the user did not opt in to loading them."""


class DegenerateResultError(UserInputError):
    """A result that is NaN, infinite, empty or otherwise degenerate (a model whose outputs are not
    finite, a fine-tune that diverged). It is never published; rerunning the same input cannot help,
    so it is permanent like a bad input."""


class WeakBackdoorError(Exception):
    """The attack kit's backdoor did not reach the target ASR on its validation split. The attack
    folder is complete and says so (attack.json `implant.reached: false`); the CLI exits with
    `EXIT_WEAK_BACKDOOR` so that no defence is unknowingly measured against it."""


class NotVerifiedError(Exception):
    """`disp verify`: the run does not match its provenance; each mismatch has been printed. The CLI
    exits with `EXIT_NOT_VERIFIED`."""


_warned: set[str] = set()


def warn_user(message: str) -> None:
    """A setting that is allowed but probably not meant: one line on stderr, once per process."""
    if message not in _warned:
        _warned.add(message)
        logs.say(message, level="warning", text=f"disp: warning: {message}")
