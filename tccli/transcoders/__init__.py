"""Transcoders as objects and files: the ``Transcoder`` module (encoder, activation, decoder, skip),
tc's own folders, and every public format tc reads and writes (``transcoders.formats``)."""
