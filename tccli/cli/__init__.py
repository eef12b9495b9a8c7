"""The `tc` command line: flags in, library calls, data on stdout, logs and one-line errors on stderr.

Owns the typer application (``app``: one function per subcommand, each building its settings from a
``tccli.config`` dataclass), the console-script entry point (``entry``), ``tc info``'s summaries of
any tc file, and the shell-completion scripts. Importing this package imports no torch: each command
imports the library it needs when it runs.
"""
