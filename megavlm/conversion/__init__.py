"""Hugging Face <-> megavlm checkpoint mapping."""
