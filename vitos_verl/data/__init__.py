"""Parquet schema, prompt templates and dataset helpers of ViToS."""

from vitos_verl.data.prompts import chat, render
from vitos_verl.data.schema import make_row

__all__ = ["chat", "make_row", "render"]
