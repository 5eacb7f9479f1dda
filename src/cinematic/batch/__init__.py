"""``cinematic batch``: one video per line of a JSONL file, on local worker processes or on a Ray cluster.

- :mod:`cinematic.batch.lines`: the prompts file, read into :class:`~cinematic.batch.lines.Task` s (one per line).
- :mod:`cinematic.batch.manifest`: the output folder (its lock, its leftovers) and the JSONL manifest of outcomes.
- :mod:`cinematic.batch.worker`: one loaded pipeline making one task's video at a time; what a worker process or a
  Ray actor holds.
- :mod:`cinematic.batch.local` and :mod:`cinematic.batch.on_ray`: the two ways of running the workers.
- :mod:`cinematic.batch.driver`: what is left to do, handing it out, recording what came back.
- :mod:`cinematic.batch.cli`: the sub-command.

Like ``serve`` and ``train``, this is an upper layer: the library never imports it. Importing it imports neither
torch nor ray.
"""
