"""Recipes and experiments built on the cinematic library; nothing in ``src/cinematic`` imports them."""
