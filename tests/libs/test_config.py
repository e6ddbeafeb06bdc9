import base64
from typing import Any

import pytest

from ingest.settings import Settings as IngestSettings
from profile_service.settings import Settings as ProfileSettings
from render.settings import Settings as RenderSettings
from sendtime_common.config import ConfigError, env_bool, env_float, env_int, env_str
from sendtime_common.identifiers import IdentifierHasher, IdentifierKind


def test_unset_or_blank_variables_take_the_default() -> None:
    assert env_str({}, "X", "d") == "d"
    assert env_str({"X": "  "}, "X", "d") == "d"
    assert env_int({"X": ""}, "X", 7) == 7
    assert env_float({}, "X", 0.5) == 0.5
    assert env_bool({"X": " "}, "X", True) is True


def test_values_are_parsed() -> None:
    assert env_str({"X": " v "}, "X", "d") == "v"
    assert env_int({"X": "12"}, "X", 7) == 12
    assert env_float({"X": "1.5"}, "X", 0.5) == 1.5
    assert [env_bool({"X": v}, "X", True) for v in ("false", "No", "OFF", "0")] == [False] * 4
    assert [env_bool({"X": v}, "X", False) for v in ("true", "Yes", "on", "1")] == [True] * 4


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: env_int({"PORT": "abc"}, "PORT", 1), "PORT must be an integer, got 'abc'"),
        (lambda: env_int({"PORT": "0"}, "PORT", 1, minimum=1), "PORT must be at least 1, got 0"),
        (lambda: env_float({"T": "soon"}, "T", 1.0), "T must be a number, got 'soon'"),
        (lambda: env_bool({"B": "maybe"}, "B", True), "B must be true or false, got 'maybe'"),
    ],
)
def test_bad_values_name_the_variable(call: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        call()  # type: ignore[operator]
    assert str(caught.value) == message


@pytest.mark.parametrize("settings", [IngestSettings, ProfileSettings, RenderSettings])
def test_every_service_names_erased_identifiers_with_the_same_keys(settings: Any) -> None:
    key = base64.b64encode(b"k" * 32).decode()
    eve = (IdentifierKind.EMAIL, "eve@example.com")
    configured = settings.from_env({"IDENTIFIER_HASH_KEYS": key}).identifier_hasher
    assert configured.hash(eve) == IdentifierHasher([b"k" * 32]).hash(eve)
    assert not settings.from_env({}).identifier_hasher.keyed


@pytest.mark.parametrize("settings", [IngestSettings, ProfileSettings, RenderSettings])
def test_every_service_takes_the_planners_random_page_cost_from_the_environment(settings: Any) -> None:
    assert settings().database_random_page_cost == 1.1
    assert settings.from_env({"DATABASE_RANDOM_PAGE_COST": "4"}).database_random_page_cost == 4.0
    with pytest.raises(ConfigError, match="DATABASE_RANDOM_PAGE_COST"):
        settings.from_env({"DATABASE_RANDOM_PAGE_COST": "0"})
