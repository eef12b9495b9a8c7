"""How a run behaves as a process: safe outputs (atomic writes, locks), Ctrl-C and SIGTERM, progress
bars on stderr, torchrun's process groups and the C allocator's settings. No math, no model."""
