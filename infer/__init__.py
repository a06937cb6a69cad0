"""Inference: the generation engine, sampling, and the CLI."""

from infer.engine import Engine, GenerationResult, StreamEvent
from infer.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "SamplingParams", "StreamEvent"]
