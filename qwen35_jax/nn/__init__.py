"""Flax NNX modules of the Qwen3.5 text model."""
