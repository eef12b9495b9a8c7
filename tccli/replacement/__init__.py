"""The local replacement model: the model's forward pass on one prompt with attention patterns and
normalisation scales frozen and MLPs replaced by transcoders; prompts, targets, exact direct
attributions through it, and interventions (ablate, set, scale) on its nodes."""
