"""`tc circuit`: greedy path search back from a target through transcoder features, attention heads
and embeddings, and circuit graphs as files (JSON, DOT, pictures, Neuronpedia); `tc export`."""
