"""Settings: one torch-free dataclass per subcommand, whose fields carry their own help text.

The same dataclass builds the command's flags (``tccli.cli``), is validated before anything heavy is
imported, and is written beside the results it produced. The choice tuples the settings validate
against (kinds, formats, modes) live here too, so the CLI never imports torch to check a flag.
"""
