"""The error classes both sides of the project react to, kept with the store so that the operator
(which reads the artifact store) and the runner (which writes it) share them without the operator
importing the runner.

A `UserInputError` is a mistake in what the user handed over (a manifest field, a file, a URI):
permanent, its one-line message names the field or file at fault. A `TransientError` is an
environment that failed in a way a later attempt may not (storage still unreachable after the
retry budget)."""

from __future__ import annotations


class UserInputError(Exception):
    """Bad input from the user. The message must name the file, line or field at fault."""


class TransientError(Exception):
    """The environment failed in a way a later attempt may not (e.g. storage still unreachable after
    the retry budget)."""
