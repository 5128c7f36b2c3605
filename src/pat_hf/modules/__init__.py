"""Trainable heads of the distillation methods (PAT's prompts, region-aware attention and aligners)."""
