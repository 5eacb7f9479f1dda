"""``cinematic batch --ray`` on Ray clusters that the tests start: one node with two CPU workers, and two "nodes"
on this machine (``ray.cluster_utils.Cluster``). In each, one actor is killed with ``ray.kill`` once the first
video is in place: every line still ends exactly once, and the frames equal single ``cinematic generate`` calls'.

Ray is in the test extra: without it this file fails to import, it is not skipped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from cinematic.cli import main
from tests.batch_helpers import STEPS, check_finished, expected_hashes, videos, write_prompts

KILL_AFTER_S = 120


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The prompts file and the frames hash each line must have (single generate calls)."""
    folder = tmp_path_factory.mktemp("prompts")
    return write_prompts(folder / "prompts.jsonl"), expected_hashes(tmp_path_factory.mktemp("generate"))


def kill_one_actor(out: Path, killed: list[str]) -> None:
    """Once the first video is in place, kill one of the batch's actors (named cinematic-batch-...)."""
    deadline = time.monotonic() + KILL_AFTER_S
    while not videos(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    names = sorted(n for n in ray.util.list_named_actors() if n.startswith("cinematic-batch-"))
    if names:
        ray.kill(ray.get_actor(names[0]))
        killed.append(names[0])


def run_with_a_kill(prompts: Path, out: Path) -> list[str]:
    killed: list[str] = []
    killer = threading.Thread(target=kill_one_actor, args=(out, killed), daemon=True)
    killer.start()
    assert main(["batch", str(prompts), "--out", str(out), "--ray", "--workers", "2", *STEPS]) == 1
    killer.join()
    return killed


@pytest.fixture
def one_node() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture
def two_nodes() -> Iterator[Cluster]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_ray_one_node_actor_killed(prompts, one_node, tmp_path, capsys):
    path, reference = prompts
    killed = run_with_a_kill(path, tmp_path / "out")
    assert killed, "no actor was found to kill"
    check_finished(tmp_path / "out", reference)
    before = videos(tmp_path / "out")
    assert main(["batch", str(path), "--out", str(tmp_path / "out"), "--ray", *STEPS]) == 1  # nothing new
    assert videos(tmp_path / "out") == before
    assert "10 done before, 0 to make" in capsys.readouterr().err


def test_ray_two_nodes_actor_killed(prompts, two_nodes, tmp_path):
    path, reference = prompts
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert run_with_a_kill(path, tmp_path / "out")
    check_finished(tmp_path / "out", reference)
