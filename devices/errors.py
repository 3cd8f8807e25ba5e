"""Errors of the runner core (kept free of hetero so the core can be copied to a device alone)."""


class DeviceError(Exception):
    """A one-line, user-facing error: what was wrong and how to fix it. The hetero CLI prints it
    without a traceback and exits non-zero."""

    exit_code = 2
