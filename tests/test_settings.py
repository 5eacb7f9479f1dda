"""Every generation setting is declared once (``cinematic.settings.Settings``) and appears under the same name and
bounds everywhere a user meets it: the CLI's flags, the server's OpenAPI schema, the file metadata. A bad value
for each is exit 2 from the CLI and a 422 naming the field from the server. Old names still work, with a warning."""

from __future__ import annotations

import argparse
import warnings

import pytest

from cinematic.cli import build_parser, main
from cinematic.settings import (
    ALIASES,
    SPECS,
    SettingError,
    Settings,
    check,
    flag,
    kind,
    settings_from,
    spec,
)
from tests.serve_helpers import running

PROMPT = "a red circle moving left"
# Limits as wide as the table, so the schema's bounds are the table's (narrowed only where the model narrows them).
WIDE = {"max_frames": 1024, "max_size": 2048, "max_steps": 1000, "max_prompt": 10_000}


def generate_actions() -> dict[str, argparse.Action]:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in commands.choices["generate"]._actions}


def bad_value(name: str):
    """A value outside what the table allows for ``name``."""
    s, k = spec(name), kind(name)
    if k is bool:
        return "yes"
    if k is str:
        return "nope" if s.choices else "x" * (s.max_length + 1)
    return k(s.high + 1)


def test_the_table_is_complete_and_self_consistent():
    defaults = Settings()
    for name, s in SPECS.items():
        assert s.help and kind(name) in (bool, int, float, str), name
        default = getattr(defaults, name)
        if default is not None:
            assert check(name, default) == default, name  # every default is allowed by its own bounds
        if kind(name) in (int, float):
            assert s.low is not None and s.high is not None and s.low <= s.high, name
        with pytest.raises(SettingError) as error:
            check(name, bad_value(name))
        assert error.value.field == name
    assert ALIASES == {"negative": "negative_prompt", "frames": "num_frames", "steps": "num_inference_steps",
                       "guidance": "guidance_scale"}  # fmt: skip


def test_every_setting_is_a_cli_flag_with_its_name_type_and_bounds():
    actions = generate_actions()
    for name, s in SPECS.items():
        action = actions[name]
        if name == "prompt":
            assert action.option_strings == [] and action.help == s.help  # the positional argument
            continue
        assert action.option_strings[0] == flag(name), name
        assert action.option_strings[1:] == [flag(old) for old in s.aliases], name
        assert action.default is None  # absent: the table's default, resolved in one place
        if kind(name) is bool:
            assert action.nargs == 0
            continue
        assert action.type is kind(name), name
        if kind(name) in (int, float):
            assert s.allowed(kind(name)) in action.help, name  # the bounds, as the table words them


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cinematic.serve.settings import Limits

    with running(tmp_path_factory.mktemp("settings"), limits=Limits(**WIDE)) as client:
        yield client


def _schema_type(prop: dict) -> dict:
    """The non-null branch of an optional field's schema."""
    return next((p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"), prop)


def test_every_setting_is_an_api_field_with_its_name_and_bounds(server):
    facts = server.app.state.service.model.facts
    model_bounds = {name: (low, high) for name, low, high in facts.bounds()}
    schema = server.get("/openapi.json").json()["components"]["schemas"]
    request, job = schema["VideoCreate"]["properties"], schema["VideoJob"]["properties"]
    for name, s in SPECS.items():
        assert name in request and name in job, name
        field = _schema_type(request[name])
        assert field["type"] == {bool: "boolean", int: "integer", float: "number", str: "string"}[kind(name)], name
        if s.choices:
            assert field["enum"] == list(s.choices), name
        if kind(name) in (int, float):
            low, high = model_bounds.get(name, (s.low, s.high))
            assert (field["minimum"], field["maximum"]) == (low, high), name
        if s.multiple_of:
            assert field["multipleOf"] == s.multiple_of, name
        if kind(name) is str and not s.choices:
            assert field["maxLength"] == s.max_length, name
        for old in s.aliases:
            assert request[old].get("deprecated") is True, old


def test_every_setting_is_in_the_file_metadata(tmp_path):
    from cinematic import video

    out = tmp_path / "clip.mp4"
    assert main(["generate", PROMPT, "--num-inference-steps", "1", "--seed", "3", "-o", str(out)]) == 0
    metadata = video.read(out).metadata
    assert set(SPECS) <= set(metadata)
    assert metadata["num_inference_steps"] == 1 and metadata["seed"] == 3 and metadata["prompt"] == PROMPT
    assert metadata["num_frames"] == 16 and metadata["guidance_scale"] == 9.0 and metadata["sampler"] == "ddim"
    assert metadata["steps"] == 1  # the deprecated name, still written for readers of the old key


@pytest.mark.parametrize("name", list(SPECS))
def test_a_bad_value_is_exit_2_from_the_cli_naming_the_setting(name, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    value = bad_value(name)
    if name == "prompt":
        args = [value]
    elif kind(name) is bool:
        args = [PROMPT, f"{flag(name)}={value}"]
    else:
        args = [PROMPT, flag(name), str(value)]
    assert main(["generate", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f"{name}:" in err[0] or flag(name) in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("name", list(SPECS))
def test_a_bad_value_is_a_422_naming_the_setting(name, server):
    body = {"prompt": PROMPT, name: bad_value(name)}
    response = server.post("/v1/videos", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == name


def test_model_dependent_bounds_are_checked_with_the_model(server):
    facts = server.app.state.service.model.facts
    response = server.post("/v1/videos", json={"prompt": PROMPT, "cache_depth": facts.levels + 1})
    assert response.status_code == 422 and response.json()["error"]["param"] == "cache_depth"
    response = server.post("/v1/videos", json={"prompt": PROMPT, "window": 4, "window_stride": 5})
    assert response.status_code == 422 and response.json()["error"]["param"] == "window_stride"


def test_old_names_are_deprecated_aliases_everywhere(server, tmp_path, capsys):
    with pytest.warns(DeprecationWarning, match="'steps' is deprecated; use 'num_inference_steps'"):
        assert settings_from({"prompt": PROMPT, "steps": 7}).num_inference_steps == 7
    with pytest.raises(SettingError, match="given twice"):
        settings_from({"prompt": PROMPT, "steps": 7, "num_inference_steps": 8})
    out = tmp_path / "old.mp4"
    assert main(["generate", PROMPT, "--steps", "1", "--frames", "2", "--guidance", "3", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--steps is deprecated; use --num-inference-steps" in err and "--frames is deprecated" in err
    from cinematic import video

    metadata = video.read(out).metadata
    assert (metadata["num_inference_steps"], metadata["num_frames"], metadata["guidance_scale"]) == (1, 2, 3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        response = server.post("/v1/videos", json={"prompt": PROMPT, "steps": 2, "frames": 4, "guidance": 2.5})
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["num_inference_steps"], job["num_frames"], job["guidance_scale"]) == (2, 4, 2.5)
    assert (job["steps"], job["frames"], job["guidance"]) == (2, 4, 2.5)  # old readers still find them
    assert job["size"] == "32x32" and job["seconds"] == f"{4 / 8:g}"
    server.delete(f"/v1/videos/{job['id']}")


def test_a_stored_job_of_the_first_store_still_loads():
    from cinematic.serve.store import Params

    old = (
        '{"prompt": "", "negative_prompt": null, "model": "shapes", "frames": 8, "width": 32, "height": 32, '
        '"steps": 4, "guidance": 9.0, "seed": 7, "sampler": "ddim", "fps": 8.0, "prompt_schedule": "0: a b", '
        '"window": null, "window_stride": null, "init_video": null, "init_image": null, "strength": null, '
        '"loop": false, "freeu": false, "freeinit": 0, "loras": [["purple", 1.0]]}'
    )
    params = Params.from_json(old)
    s = params.settings
    assert (s.prompt, s.prompt_schedule, s.num_frames, s.num_inference_steps, s.guidance_scale) == (
        None, "0: a b", 8, 4, 9.0,
    )  # fmt: skip
    assert params.model == "shapes" and params.loras == (("purple", 1.0),)
    assert Params.from_json(params.to_json()) == params
