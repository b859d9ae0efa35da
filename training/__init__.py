"""Training reward heads: data, featurization through the backbone, stage 1 (objectives) and later stages."""
