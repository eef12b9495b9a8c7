"""Data: text read from files and packed into rows of tokens, and the HDF5 activation cache that
`tc cache` writes and `tc train` / `tc info` read."""
