"""`tc graph`: whole attribution graphs of a prompt (every active feature's exact edges), pruned by
influence and scored, and their files."""
