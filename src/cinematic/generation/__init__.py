"""The steps of a generation, one module each, in the order ``Pipeline.__call__`` runs them: ``prompts`` (text
features), ``noise`` (the seeds' initial noise), ``pictures`` (starting from a clip or a picture), ``denoiser`` (the
guided network the sampler calls), then a sampler of :mod:`cinematic.diffusion`, and ``frames`` (decoding).
``loading`` loads a model for them."""
