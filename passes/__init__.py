"""Graph analyses and rewrites over a TrainingGraph; each module is one pass."""
