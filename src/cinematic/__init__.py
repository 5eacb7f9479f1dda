"""cinematic: the ModelScope text-to-video-ms-1.7b model, from scratch in PyTorch.

Nothing heavy is imported here, so that ``cinematic --help`` answers at once.
"""

__version__ = "0.1.0"
