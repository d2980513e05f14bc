"""Conversions between longtrain checkpoints and other formats (Hugging Face export)."""
