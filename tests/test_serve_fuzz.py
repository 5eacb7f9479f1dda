"""schemathesis against our own OpenAPI schema, over HTTP to the real app: no request may get a 5xx.

It generates valid and invalid requests for every operation (bodies, query strings, ids, headers), a bounded
number per operation, and also valid requests about a job that exists. Limits are tiny so that the jobs it
manages to queue finish in a moment, and the queue is short so that 429 is exercised too. It runs against both
stores: SQLite in the data folder with EXAMPLES per case, and a PostgreSQL database with PG_EXAMPLES (fewer: the
HTTP layer is the same, and the suite has a time budget).
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra")
pytest.importorskip("fastapi", reason="the serve extra is not installed")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from cinematic.serve.app import create_app  # noqa: E402
from cinematic.serve.settings import Limits  # noqa: E402
from tests.postgres import STORES  # noqa: E402
from tests.serve_helpers import quick_settings, serve_in_thread, wait_status  # noqa: E402

EXAMPLES = 60  # per operation and mode: the whole file takes about half a minute
PG_EXAMPLES = 15
OPERATIONS = [
    ("POST", "/v1/videos"),
    ("GET", "/v1/videos"),
    ("GET", "/v1/videos/{video_id}"),
    ("GET", "/v1/videos/{video_id}/content"),
    ("DELETE", "/v1/videos/{video_id}"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
]
# Valid and invalid requests for each operation (/healthz takes no input, so nothing sent to it is invalid), and
# valid requests about a job that exists for each operation on one.
CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in ("positive", "negative", "existing job")
    if (mode != "negative" or path != "/healthz") and (mode != "existing job" or "{video_id}" in path)
]


@pytest.fixture(scope="module", params=STORES)
def api(request, tmp_path_factory):
    """The schema, served by the real app, the id of a completed job (so not every id is a 404), and the number of
    examples per case."""
    store = request.getfixturevalue("postgres").database() if request.param == "postgres" else None
    limits = Limits(max_frames=4, max_size=48, max_steps=2, max_prompt=100)
    settings = quick_settings(tmp_path_factory.mktemp("fuzz") / "data", max_queue=3, limits=limits, store=store)
    app = create_app(settings)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        job = client.post("/v1/videos", json={"prompt": "a red circle", "frames": 2, "steps": 1}).json()
        wait_status(client, job["id"], ("completed",))
        examples = EXAMPLES if store is None else PG_EXAMPLES
        yield schemathesis.openapi.from_url(f"{url}/openapi.json"), job["id"], examples


def test_schema_lists_every_operation(api):
    schema, _, _ = api
    operations = [(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()]
    assert sorted(operations) == sorted(OPERATIONS)


# schemathesis's own pytest plugin (``schema.parametrize``) does not run under the pinned pytest 9, so each
# operation's strategy drives a plain Hypothesis test.
@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_no_server_errors(api, method, path, mode):
    schema, existing, examples = api
    operation = schema[path][method]
    if mode == "existing job":
        strategy = operation.as_strategy(path_parameters={"video_id": existing})
    else:
        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
    statuses: Counter[int] = Counter()

    @given(case=strategy)
    @settings(
        max_examples=examples,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case):
        statuses[case.call_and_validate(checks=[not_a_server_error], timeout=30).status_code] += 1

    run()
    print(method, path, mode, dict(statuses))
    assert statuses.total() > 0
