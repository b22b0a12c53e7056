"""The agent config's ``[vms]`` (VmSettings) and ``[arrays.NAME]`` (ArrayAccess) sections: the
TOML round trip, the defaults, and one-line errors that name the setting."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmcluster.agent.config import (
    AgentConfig,
    ArrayAccess,
    Timings,
    VmSettings,
    load_config,
)
from vmcluster.core.model import NAME_RE
from vmcluster.errors import InvalidInput

BASE = """\
cluster = "prod"
node = "n1"
secrets_file = "/etc/vmcluster/secrets.json"
etcd = ["http://10.0.1.11:2379"]
api_socket = "/run/vmcluster/api.sock"

[networks]
cluster1 = "10.0.1.11"
"""

ARRAY_A1 = """
[arrays.a1]
service = ["10.0.11.101:10810", "10.0.12.101:10810"]
nbd = ["10.0.11.101:10809", "10.0.12.101:10809"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def config(**overrides: object) -> AgentConfig:
    values: dict[str, object] = {
        "cluster": "prod",
        "node": "n1",
        "networks": {"cluster1": "10.0.1.11", "cluster2": "10.0.2.11"},
        "etcd": ("http://10.0.1.11:2379", "http://10.0.1.12:2379"),
        "secrets_file": "/etc/vmcluster/secrets.json",
        "api_socket": "/run/vmcluster/api.sock",
    }
    values.update(overrides)
    return AgentConfig(**values)  # type: ignore[arg-type]


def array(name: str = "a1", **overrides: object) -> ArrayAccess:
    values: dict[str, object] = {
        "name": name,
        "service": ("10.0.11.101:10810", "10.0.12.101:10810"),
        "nbd": ("10.0.11.101:10809", "10.0.12.101:10809"),
    }
    values.update(overrides)
    return ArrayAccess(**values)  # type: ignore[arg-type]


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(InvalidInput) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----- round trip and defaults -----


def test_defaults_when_the_sections_are_absent(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, BASE))
    assert loaded.vms == VmSettings()
    assert loaded.vms.memory_mib == 16384
    assert loaded.vms.run_dir == "/run/vmcluster"
    assert loaded.vms.images_dir == "/var/lib/vmcluster/images"
    assert loaded.vms.accel == "auto"
    assert dict(loaded.arrays) == {}
    assert loaded.timings == Timings()


def test_a_partial_vms_section_keeps_the_other_defaults(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, BASE + '\n[vms]\naccel = "tcg"\nmemory_mib = 2048\n'))
    assert loaded.vms == VmSettings(accel="tcg", memory_mib=2048)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, BASE + ARRAY_A1))
    assert dict(loaded.arrays) == {"a1": array("a1")}
    assert loaded.arrays["a1"].nbd == ("10.0.11.101:10809", "10.0.12.101:10809")
    assert loaded.arrays["a1"].service == ("10.0.11.101:10810", "10.0.12.101:10810")


def test_round_trip_with_vms_and_two_arrays(tmp_path: Path) -> None:
    original = config(
        site="east",
        api_listen="10.0.1.11:7480",
        timings=Timings(lease_ttl_s=4, self_fence_margin_s=1.25, heartbeat_interval_s=0.1),
        vms=VmSettings(memory_mib=2048, run_dir="/tmp/run dir", images_dir="/img", accel="kvm"),
        arrays={
            "a1": array("a1"),
            "b-2": array("b-2", service=("[fd00::1]:10810",), nbd=("[fd00::1]:10809",)),
        },
    )
    loaded = load_config(write(tmp_path, original.to_toml()))
    assert loaded == original
    assert list(loaded.arrays) == ["a1", "b-2"]


text = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=0xFFFF, exclude_categories=("Cs",)),
    max_size=20,
)
hosts = st.sampled_from(["10.0.0.1", "array1.example", "localhost", "[::1]"])
portals = st.builds(lambda h, p: f"{h}:{p}", hosts, st.integers(1, 65535))
array_names = st.from_regex(NAME_RE, fullmatch=True)


@settings(max_examples=50, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    vms=st.builds(
        VmSettings,
        memory_mib=st.integers(0, 1 << 30),
        run_dir=text,
        images_dir=text,
        accel=st.sampled_from(["auto", "kvm", "tcg"]),
    ),
    arrays=st.dictionaries(
        array_names,
        st.tuples(
            st.lists(portals, min_size=1, max_size=3), st.lists(portals, min_size=1, max_size=3)
        ),
        max_size=3,
    ),
)
def test_round_trip_property(
    tmp_path: Path, vms: VmSettings, arrays: dict[str, tuple[list[str], list[str]]]
) -> None:
    original = config(
        vms=vms,
        arrays={name: ArrayAccess(name=name, service=tuple(service), nbd=tuple(nbd))
                for name, (service, nbd) in arrays.items()},
    )  # fmt: skip
    assert load_config(write(tmp_path, original.to_toml())) == original


# ----- ArrayAccess.portal -----


def test_portal_splits_host_and_port_in_order() -> None:
    access = array(nbd=("10.0.11.101:10809", "storage-b:20000"))
    assert access.portal() == ("10.0.11.101", 10809)
    assert access.portal(0) == ("10.0.11.101", 10809)
    assert access.portal(1) == ("storage-b", 20000)
    port = access.portal(1)[1]
    assert isinstance(port, int)


# ----- errors -----


@pytest.mark.parametrize("accel", ["xen", "KVM", ""])
def test_bad_accel(tmp_path: Path, accel: str) -> None:
    message = load_error(tmp_path, BASE + f'\n[vms]\naccel = "{accel}"\n')
    assert "vms.accel" in message
    assert repr(accel) in message
    assert "auto, kvm or tcg" in message


def test_bad_accel_in_the_dataclass() -> None:
    with pytest.raises(InvalidInput, match=r"^vms\.accel 'hvf': use auto, kvm or tcg$"):
        VmSettings(accel="hvf")


@pytest.mark.parametrize("memory", ["-1", '"lots"', "1.5"])
def test_bad_vm_memory(tmp_path: Path, memory: str) -> None:
    assert "vms.memory_mib" in load_error(tmp_path, BASE + f"\n[vms]\nmemory_mib = {memory}\n")


@pytest.mark.parametrize("portal", ["array1", "10.0.0.1:0", "10.0.0.1:70000", ":10809",
                                    "10.0.0.1:", "10.0.0.1:port"])  # fmt: skip
def test_bad_nbd_portal(tmp_path: Path, portal: str) -> None:
    body = ARRAY_A1.replace('nbd = ["10.0.11.101:10809", "10.0.12.101:10809"]',
                            f'nbd = ["10.0.11.101:10809", "{portal}"]')  # fmt: skip
    message = load_error(tmp_path, BASE + body)
    assert message == f"arrays.a1: nbd portal {portal!r} must be HOST:PORT"


def test_portal_bounds_are_inclusive() -> None:
    assert array(nbd=("h:1",)).portal() == ("h", 1)
    assert array(nbd=("h:65535",)).portal() == ("h", 65535)
    with pytest.raises(InvalidInput, match="nbd portal 'h:65536'"):
        array(nbd=("h:65536",))


def test_empty_nbd_list(tmp_path: Path) -> None:
    body = ARRAY_A1.replace('["10.0.11.101:10809", "10.0.12.101:10809"]', "[]")
    message = load_error(tmp_path, BASE + body)
    assert message == "arrays.a1: nbd needs at least one HOST:PORT portal"


@pytest.mark.parametrize("name", ["A1", "1a", "a_1", "a1-"])
def test_bad_array_name(tmp_path: Path, name: str) -> None:
    message = load_error(tmp_path, BASE + ARRAY_A1.replace("[arrays.a1]", f'[arrays."{name}"]'))
    assert f"invalid array name {name!r}" in message


@pytest.mark.parametrize("portal", ["array1", "10.0.0.1:0", ":10810", "10.0.0.1:port"])
def test_bad_service_address(tmp_path: Path, portal: str) -> None:
    body = ARRAY_A1.replace('service = ["10.0.11.101:10810", "10.0.12.101:10810"]',
                            f'service = ["{portal}", "10.0.12.101:10810"]')  # fmt: skip
    message = load_error(tmp_path, BASE + body)
    assert message == f"arrays.a1: service address {portal!r} must be HOST:PORT"


def test_empty_service_list(tmp_path: Path) -> None:
    body = ARRAY_A1.replace('["10.0.11.101:10810", "10.0.12.101:10810"]', "[]")
    message = load_error(tmp_path, BASE + body)
    assert message == "arrays.a1: service needs at least one HOST:PORT address"


@pytest.mark.parametrize("key", ["qmp_socket", "directory"])
def test_an_old_array_table_is_refused_with_the_fix(tmp_path: Path, key: str) -> None:
    """Nodes no longer drive an array's daemon themselves (a socket and a directory they
    shared with it): a config that says so is refused, naming what replaces it."""
    old = ARRAY_A1.replace("[arrays.a1]\n", f'[arrays.a1]\n{key} = "/srv/arrays/a1/x"\n')
    message = load_error(tmp_path, BASE + old)
    where = f"agent config {tmp_path / 'agent.toml'}: arrays.a1"
    assert message.startswith(
        f"{where}: {key!r} is no longer used (nodes reach an array only over the storage "
        "networks): replace qmp_socket and directory with service = ["
    )


@pytest.mark.parametrize("key", ["service", "nbd"])
def test_missing_key_in_an_array_table(tmp_path: Path, key: str) -> None:
    body = "\n".join(line for line in ARRAY_A1.splitlines() if not line.startswith(key))
    message = load_error(tmp_path, BASE + body + "\n")
    assert message.endswith(f"{key!r} is missing")
    assert str(tmp_path / "agent.toml") in message


@pytest.mark.parametrize("margin", ["0.01", "0.0", "1.5", "2.0", "-1"])
def test_self_fence_margin_out_of_range(tmp_path: Path, margin: str) -> None:
    # With a 2 s lease the margin must be 0.05 s up to (not including) 1.5 s.
    timings = f"\n[timings]\nlease_ttl_s = 2\nself_fence_margin_s = {margin}\n"
    message = load_error(tmp_path, BASE + timings)
    assert "timings.self_fence_margin_s" in message


# In range and within the timing invariant (tests/agent/test_config_timings.py has the rest).
@pytest.mark.parametrize(("ttl", "margin"), [(3, 0.35), (3, 0.7), (10, 5.9)])
def test_self_fence_margin_in_range(tmp_path: Path, ttl: int, margin: float) -> None:
    loaded = load_config(
        write(
            tmp_path, BASE + f"\n[timings]\nlease_ttl_s = {ttl}\nself_fence_margin_s = {margin}\n"
        )
    )
    assert loaded.timings.self_fence_margin_s == margin


def test_the_margin_scales_with_the_lease() -> None:
    Timings(lease_ttl_s=10, self_fence_margin_s=5.0)
    with pytest.raises(InvalidInput, match="self_fence_margin_s"):
        Timings(lease_ttl_s=2, self_fence_margin_s=5.0)


def test_unknown_vms_setting(tmp_path: Path) -> None:
    message = load_error(tmp_path, BASE + "\n[vms]\nmemory = 1024\n")
    assert "memory" in message
