"""``cinematic serve``: text to video over HTTP, as a job queue that survives restarts.

- ``settings.py``  what the server is told (flags, ``CINEMATIC_*`` variables)
- ``store.py``     the jobs, in SQLite (WAL); the rules that keep them from being lost or run twice
- ``pg_store.py``  the jobs of a fleet of servers, in PostgreSQL: the same rules, with leases
- ``files.py``     the video files, named from job ids only; gif and webm made on first request
- ``worker.py``    one thread per device with a warm pipeline
- ``service.py``   the above, opened together; what the HTTP layer calls
- ``app.py``       the FastAPI application: ``/v1/videos`` (OpenAI Videos-shaped), ``/healthz``, ``/metrics``, ``/``
- ``static/``      the web page: plain HTML, CSS and JavaScript, no build step
- ``cli.py``       the ``cinematic serve`` sub-command

FastAPI and uvicorn come with the ``serve`` extra: ``pip install 'cinematic[serve]'``; psycopg (for a PostgreSQL
store) with the ``postgres`` extra.
"""
