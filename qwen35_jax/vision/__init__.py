"""Qwen3.5 vision: the ViT encoder and its host-side inputs."""
