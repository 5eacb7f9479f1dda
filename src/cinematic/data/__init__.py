"""Datasets for training and evaluating small text-to-video models."""
