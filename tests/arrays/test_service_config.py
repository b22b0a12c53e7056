"""The array service's configuration file: the round trip and one-line errors naming the
setting."""

from pathlib import Path

import pytest

from vmcluster.arrays.serviceconfig import ServiceConfig, load_service_config
from vmcluster.errors import InvalidInput, NotFound

GOOD = ServiceConfig(array="a1", directory="/srv/arrays/a1", qmp_socket="/run/a1.qmp",
                     listen=("10.0.11.101:10810", "[fd00::1]:10810"))  # fmt: skip


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "array-service.toml"
    path.write_text(text)
    return path


def test_round_trip(tmp_path: Path) -> None:
    assert load_service_config(write(tmp_path, GOOD.to_toml())) == GOOD


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.to_toml() + "port = 1\n", "unknown setting 'port'"),
        (GOOD.to_toml().replace('array = "a1"\n', ""), "'array' is missing"),
        (GOOD.to_toml().replace('array = "a1"', 'array = "A1"'), "invalid array name 'A1'"),
        (GOOD.to_toml().replace('directory = "/srv/arrays/a1"', "directory = 3"),
         "directory must be a string"),
        (GOOD.to_toml().replace('"10.0.11.101:10810", ', '"10.0.11.101", '),
         "array a1: listen: address '10.0.11.101' must be HOST:PORT"),
        (GOOD.to_toml().replace('["10.0.11.101:10810", "[fd00::1]:10810"]', "[]"),
         "array a1: listen needs at least one HOST:PORT"),
        (GOOD.to_toml().replace('["10.0.11.101:10810", "[fd00::1]:10810"]', '"x:1"'),
         "listen must be a list of HOST:PORT"),
        ("array = [", "array-service.toml: "),
    ],
)  # fmt: skip
def test_errors_name_the_setting(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        load_service_config(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match=r"array service config .* does not exist"):
        load_service_config(tmp_path / "nothing.toml")
