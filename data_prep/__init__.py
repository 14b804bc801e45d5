"""Converters from the public medical VQA releases to ViToS verl parquet."""
