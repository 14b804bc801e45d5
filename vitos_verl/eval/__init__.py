"""Evaluation: two-pass inference, metrics, reports, kept-token overlays."""
