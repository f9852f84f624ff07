"""Recipes: the end-to-end jobs (train, select, demo, and the delta file tools), with one config
style, one model loader and one batch builder. Only this layer (and the CLI above it) reads
files, YAML or flags; the library packages below know nothing of them."""
