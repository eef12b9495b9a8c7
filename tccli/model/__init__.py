"""The language model: loading it through TransformerLens 4, its hooks and weights, running it to
capture MLP inputs and outputs, and the spaces (normalised, centred) a transcoder reads and writes."""
