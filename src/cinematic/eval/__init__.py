"""Evaluation: judging generated videos against their captions."""
