"""vitos-verl: ViToS (token-sparse medical multimodal reasoning, dual-stream GRPO) on verl."""

__version__ = "0.1.0"
