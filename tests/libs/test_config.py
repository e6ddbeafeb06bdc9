import pytest

from sendtime_common.config import ConfigError, env_float, env_int, env_str


def test_unset_or_blank_variables_take_the_default() -> None:
    assert env_str({}, "X", "d") == "d"
    assert env_str({"X": "  "}, "X", "d") == "d"
    assert env_int({"X": ""}, "X", 7) == 7
    assert env_float({}, "X", 0.5) == 0.5


def test_values_are_parsed() -> None:
    assert env_str({"X": " v "}, "X", "d") == "v"
    assert env_int({"X": "12"}, "X", 7) == 12
    assert env_float({"X": "1.5"}, "X", 0.5) == 1.5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: env_int({"PORT": "abc"}, "PORT", 1), "PORT must be an integer, got 'abc'"),
        (lambda: env_int({"PORT": "0"}, "PORT", 1, minimum=1), "PORT must be at least 1, got 0"),
        (lambda: env_float({"T": "soon"}, "T", 1.0), "T must be a number, got 'soon'"),
    ],
)
def test_bad_values_name_the_variable(call: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        call()  # type: ignore[operator]
    assert str(caught.value) == message
