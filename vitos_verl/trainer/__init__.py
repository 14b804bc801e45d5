"""The dual-stream GRPO trainer on verl: config, stream orders, prune modes, cross-feedback."""

from vitos_verl.trainer.config import ViToSConfig
from vitos_verl.trainer.streams import PRUNE_MODES, STREAM_ORDERS, cross_feedback, reasoning_input, update_stages

__all__ = ["PRUNE_MODES", "STREAM_ORDERS", "ViToSConfig", "cross_feedback", "reasoning_input", "update_stages"]
