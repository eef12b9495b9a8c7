"""The `tc` console script and `python -m tccli`: answers `tc --version` at once, else runs the CLI.

Importing `tccli.cli.app` imports typer, rich and the settings (a fraction of a second; torch and
transformer_lens load only when a command runs), which a version query does not need either.
"""

from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--version"]:
        from tccli import __version__

        print(f"tc {__version__}")
        return
    from tccli.runtime import interrupts

    interrupts.install()  # before the imports below: Ctrl-C during start-up is one line too
    try:
        from tccli.cli.app import main as cli_main
    except interrupts.Interrupted as exc:
        print(f"tc: interrupted; {interrupts.hint(args)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    cli_main(args)
