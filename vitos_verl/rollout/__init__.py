"""Pruned rollouts: the vLLM plugin and the matching transformers-side inputs."""
