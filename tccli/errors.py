"""The one exception type users see: its message is printed as a single line, exit code 2."""


class TcError(Exception):
    """Bad input or an unusable environment, described in one line for the user.

    Library code raises this instead of letting a traceback reach the terminal; `tccli.cli.app.main`
    prints ``tc: error: <message>`` on stderr and exits non-zero.
    """

    exit_code = 2


def fail(message: str) -> "TcError":
    """Build a TcError; written ``raise fail(...)`` so the raise is visible at the call site."""
    return TcError(message)
