"""HF checkpoint names, safetensors reading and loading into the NNX model."""
