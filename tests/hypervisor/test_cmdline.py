"""Unit tests for vmcluster.hypervisor.cmdline: the QEMU argv for one VM instance."""

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmcluster.core.model import DiskSpec, NicMode, NicSpec, VmSpec, default_mac
from vmcluster.core.units import MIB
from vmcluster.hypervisor.cmdline import (
    GUEST_HTTP_PORT,
    USER_NET_GATEWAY,
    USER_NET_GUEST_IP,
    Accel,
    Launch,
    build_argv,
    kernel_cmdline,
    qemu_opt_value,
)

# Every option build_argv may emit, and whether it takes a value.
OPTIONS_WITH_VALUE = {
    "-name",
    "-machine",
    "-accel",
    "-cpu",
    "-smp",
    "-m",
    "-display",
    "-msg",
    "-kernel",
    "-initrd",
    "-append",
    "-chardev",
    "-serial",
    "-mon",
    "-pidfile",
    "-blockdev",
    "-device",
    "-netdev",
}
FLAGS = {"-nodefaults", "-no-user-config", "-no-reboot", "-daemonize"}
JSON_OPTIONS = {"-blockdev", "-device", "-netdev"}


def make_launch(
    spec: VmSpec | None = None,
    *,
    root: str = "/var/lib/vmcluster/vms/web",
    accel: Accel = Accel.KVM,
    generation: int = 7,
    daemonize: bool = True,
    http_ports: tuple[int, ...] | None = None,
    **paths: Any,
) -> Launch:
    spec = spec or VmSpec(name="web")
    base = Path(root)
    user_nics = [n for n in spec.nics if n.mode is NicMode.USER]
    values: dict[str, Any] = {
        "kernel": base / "image" / "vmlinuz",
        "initrd": base / "image" / "initrd.img",
        "disk_files": tuple(base / f"{d.name}.raw" for d in spec.disks),
        "qmp_socket": base / "qmp.sock",
        "console_log": base / "console.log",
        "pidfile": base / "qemu.pid",
    }
    values.update(paths)
    return Launch(
        spec=spec,
        accel=accel,
        generation=generation,
        daemonize=daemonize,
        http_ports=tuple(8000 + i for i in range(len(user_nics)))
        if http_ports is None
        else http_ports,
        **values,
    )


def full_spec() -> VmSpec:
    return VmSpec(
        name="web",
        vcpus=2,
        memory_mib=256,
        disks=(
            DiskSpec(name="root", size_bytes=64 * MIB),
            DiskSpec(name="log", size_bytes=8 * MIB),
        ),
        nics=(
            NicSpec(mode=NicMode.USER, mac="52:54:00:00:00:01"),
            NicSpec(mode=NicMode.USER, mac="52:54:00:00:00:02"),
        ),
        probe_interval_ms=250,
    )


def parse_argv(argv: list[str]) -> list[tuple[str, str | None]]:
    """Split argv[1:] into (option, value) pairs, failing on anything that is not an option."""
    pairs: list[tuple[str, str | None]] = []
    rest = argv[1:]
    index = 0
    while index < len(rest):
        option = rest[index]
        if option in FLAGS:
            pairs.append((option, None))
            index += 1
        elif option in OPTIONS_WITH_VALUE:
            assert index + 1 < len(rest), f"{option} has no value"
            pairs.append((option, rest[index + 1]))
            index += 2
        else:
            raise AssertionError(f"unexpected standalone argument {option!r}")
    return pairs


def values_of(argv: list[str], option: str) -> list[str]:
    return [v for o, v in parse_argv(argv) if o == option and v is not None]


def single(argv: list[str], option: str) -> str:
    (value,) = values_of(argv, option)
    return value


def qemu_opts(text: str) -> list[tuple[str, str | None]]:
    """Parse QEMU's key=value,key=value syntax, where ',,' is a literal comma."""
    items: list[str] = []
    current = ""
    index = 0
    while index < len(text):
        char = text[index]
        if char == ",":
            if text[index + 1 : index + 2] == ",":
                current += ","
                index += 2
                continue
            items.append(current)
            current = ""
        else:
            current += char
        index += 1
    items.append(current)
    parsed: list[tuple[str, str | None]] = []
    for item in items:
        key, eq, value = item.partition("=")
        parsed.append((key, value) if eq else (key, None))
    return parsed


def json_objects(argv: list[str], option: str) -> list[dict[str, Any]]:
    return [json.loads(v) for v in values_of(argv, option)]


# ---------------------------------------------------------------------------- qemu_opt_value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ""),
        ("/plain/path", "/plain/path"),
        ("/a,b", "/a,,b"),
        ("a,,b", "a,,,,b"),
        (",", ",,"),
        ("/x,server=on,wait=off", "/x,,server=on,,wait=off"),
        ("/with space/and=equals", "/with space/and=equals"),
        ("/caf\u00e9", "/caf\u00e9"),
    ],
)
def test_qemu_opt_value(value: str, expected: str) -> None:
    assert qemu_opt_value(value) == expected


@pytest.mark.parametrize("char", ["\0", "\n", "\r", "\t", "\x1b", "\x1f", "\x7f", "\x85", "\x9f"])
def test_qemu_opt_value_rejects_control_characters(char: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        qemu_opt_value(f"/tmp/a{char}b")


@given(st.text(alphabet=st.characters(min_codepoint=32, exclude_categories=["Cs", "Cc"])))
def test_qemu_opt_value_round_trips_through_the_option_parser(value: str) -> None:
    assert qemu_opts(f"path={qemu_opt_value(value)}") == [("path", value)]


# ---------------------------------------------------------------------------- argv shape


def test_argv_minimal_vm() -> None:
    launch = make_launch()
    argv = build_argv(launch)
    assert argv[0] == "qemu-system-x86_64"
    pairs = parse_argv(argv)
    options = [o for o, _ in pairs]
    assert "-blockdev" not in options
    assert "-netdev" not in options
    assert values_of(argv, "-device") == []
    assert single(argv, "-name") == "guest=web,debug-threads=on"
    assert single(argv, "-machine") == "pc"
    assert single(argv, "-smp") == "1"
    assert single(argv, "-m") == "128M"
    assert single(argv, "-display") == "none"
    assert single(argv, "-kernel") == "/var/lib/vmcluster/vms/web/image/vmlinuz"
    assert single(argv, "-initrd") == "/var/lib/vmcluster/vms/web/image/initrd.img"
    assert single(argv, "-pidfile") == "/var/lib/vmcluster/vms/web/qemu.pid"
    assert single(argv, "-serial") == "chardev:console"
    assert single(argv, "-mon") == "chardev=qmp,mode=control"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert options.count(flag) == 1


def test_argv_uses_the_given_binary() -> None:
    argv = build_argv(make_launch(), qemu_binary="/opt/qemu/bin/qemu-system-x86_64")
    assert argv[0] == "/opt/qemu/bin/qemu-system-x86_64"
    assert "qemu-system-x86_64" not in argv[1:]


def test_argv_vm_shape() -> None:
    argv = build_argv(make_launch(full_spec()))
    assert single(argv, "-smp") == "2"
    assert single(argv, "-m") == "256M"


def test_kvm_uses_host_cpu() -> None:
    argv = build_argv(make_launch(accel=Accel.KVM))
    assert single(argv, "-accel") == "kvm"
    assert single(argv, "-cpu") == "host"


def test_tcg_does_not_use_host_cpu() -> None:
    argv = build_argv(make_launch(accel=Accel.TCG))
    assert single(argv, "-accel") == "tcg"
    assert single(argv, "-cpu") == "qemu64"
    assert "host" not in argv


def test_daemonize_by_default() -> None:
    spec = VmSpec(name="web")
    launch = Launch(
        spec=spec,
        kernel=Path("/k"),
        initrd=Path("/i"),
        disk_files=(),
        qmp_socket=Path("/q"),
        console_log=Path("/c"),
        pidfile=Path("/p"),
        accel=Accel.TCG,
        generation=0,
    )
    argv = build_argv(launch)
    assert argv.count("-daemonize") == 1
    assert argv[-1] == "-daemonize"


def test_no_daemonize_when_asked() -> None:
    argv = build_argv(make_launch(daemonize=False))
    assert "-daemonize" not in argv


# ---------------------------------------------------------------------------- chardevs


def chardevs(argv: list[str]) -> dict[str, list[tuple[str, str | None]]]:
    result = {}
    for value in values_of(argv, "-chardev"):
        opts = qemu_opts(value)
        ids = [v for k, v in opts if k == "id"]
        assert len(ids) == 1
        assert ids[0] is not None
        result[ids[0]] = opts
    return result


def test_chardevs() -> None:
    argv = build_argv(make_launch())
    devs = chardevs(argv)
    assert devs["console"] == [
        ("file", None),
        ("id", "console"),
        ("path", "/var/lib/vmcluster/vms/web/console.log"),
        ("append", "on"),
    ]
    assert devs["qmp"] == [
        ("socket", None),
        ("id", "qmp"),
        ("path", "/var/lib/vmcluster/vms/web/qmp.sock"),
        ("server", "on"),
        ("wait", "off"),
    ]


def test_comma_in_path_is_doubled_in_chardev_and_unchanged_in_json() -> None:
    root = "/srv/a,b/vm,id=evil,server=off"
    spec = VmSpec(name="web", disks=(DiskSpec(name="root", size_bytes=8 * MIB),))
    argv = build_argv(make_launch(spec, root=root))
    console_value = next(v for v in values_of(argv, "-chardev") if v.startswith("file,"))
    assert f"path={root.replace(',', ',,')}/console.log,append=on" in console_value
    devs = chardevs(argv)
    assert dict(devs["console"])["path"] == f"{root}/console.log"
    assert dict(devs["qmp"])["path"] == f"{root}/qmp.sock"
    assert [k for k, _ in devs["qmp"]] == ["socket", "id", "path", "server", "wait"]
    assert dict(devs["qmp"])["server"] == "on"
    (blockdev,) = json_objects(argv, "-blockdev")
    assert blockdev["file"]["filename"] == f"{root}/root.raw"
    assert ",," not in blockdev["file"]["filename"]
    # Paths in plain single-value options are passed through as they are.
    assert single(argv, "-kernel") == f"{root}/image/vmlinuz"


@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x00", "\x1b"])
@pytest.mark.parametrize("field", ["console_log", "qmp_socket"])
def test_control_character_in_chardev_path_is_refused(char: str, field: str) -> None:
    launch = make_launch(**{field: Path(f"/tmp/bad{char}name")})
    with pytest.raises(ValueError, match="control character"):
        build_argv(launch)


def test_control_character_in_disk_path_survives_json() -> None:
    spec = VmSpec(name="web", disks=(DiskSpec(name="root", size_bytes=8 * MIB),))
    path = Path('/tmp/odd\nname,x\t"quoted"\\back')
    argv = build_argv(make_launch(spec, disk_files=(path,)))
    (blockdev,) = json_objects(argv, "-blockdev")
    assert blockdev["file"]["filename"] == str(path)
    assert all(ord(c) >= 32 for c in single(argv, "-blockdev"))


# ---------------------------------------------------------------------------- disks and NICs


def test_disks_are_json_with_stop_on_error() -> None:
    spec = full_spec()
    launch = make_launch(spec)
    argv = build_argv(launch)
    blockdevs = json_objects(argv, "-blockdev")
    assert blockdevs == [
        {
            "driver": "raw",
            "node-name": "disk-root",
            "file": {"driver": "file", "filename": "/var/lib/vmcluster/vms/web/root.raw"},
            "cache": {"direct": False, "no-flush": False},
        },
        {
            "driver": "raw",
            "node-name": "disk-log",
            "file": {"driver": "file", "filename": "/var/lib/vmcluster/vms/web/log.raw"},
            "cache": {"direct": False, "no-flush": False},
        },
    ]
    disks = [d for d in json_objects(argv, "-device") if d["driver"] == "virtio-blk-pci"]
    assert disks == [
        {
            "driver": "virtio-blk-pci",
            "id": "vd-root",
            "drive": "disk-root",
            "serial": "root",
            "werror": "stop",
            "rerror": "stop",
        },
        {
            "driver": "virtio-blk-pci",
            "id": "vd-log",
            "drive": "disk-log",
            "serial": "log",
            "werror": "stop",
            "rerror": "stop",
        },
    ]


def test_nics_are_json_with_host_forwarding() -> None:
    launch = make_launch(full_spec(), http_ports=(18080, 18081))
    argv = build_argv(launch)
    assert json_objects(argv, "-netdev") == [
        {"type": "user", "id": "net0", "hostfwd": [{"str": "tcp:127.0.0.1:18080-:80"}]},
        {"type": "user", "id": "net1", "hostfwd": [{"str": "tcp:127.0.0.1:18081-:80"}]},
    ]
    nics = [d for d in json_objects(argv, "-device") if d["driver"] == "virtio-net-pci"]
    assert nics == [
        {"driver": "virtio-net-pci", "id": "nic0", "netdev": "net0", "mac": "52:54:00:00:00:01"},
        {"driver": "virtio-net-pci", "id": "nic1", "netdev": "net1", "mac": "52:54:00:00:00:02"},
    ]
    assert GUEST_HTTP_PORT == 80


def test_every_netdev_is_followed_by_its_device() -> None:
    argv = build_argv(make_launch(full_spec()))
    pairs = parse_argv(argv)
    for index, (option, value) in enumerate(pairs):
        if option == "-netdev":
            assert value is not None
            next_option, next_value = pairs[index + 1]
            assert next_option == "-device"
            assert next_value is not None
            assert json.loads(next_value)["netdev"] == json.loads(value)["id"]


# ---------------------------------------------------------------------------- kernel command line


def test_kernel_cmdline_without_nics() -> None:
    launch = make_launch(VmSpec(name="db", probe_interval_ms=50), generation=12)
    cmdline = kernel_cmdline(launch)
    assert cmdline.split(" ") == [
        "console=ttyS0",
        "loglevel=4",
        "panic=-1",
        "cryptomgr.notests",
        "mitigations=off",
        "no_timer_check",
        "tsc=reliable",
        "audit=0",
        "8250.nr_uarts=1",
        "vmcluster.name=db",
        "vmcluster.gen=12",
        "vmcluster.interval_ms=50",
    ]
    assert "vmcluster.ip" not in cmdline
    assert "vmcluster.gw" not in cmdline
    assert single(build_argv(launch), "-append") == cmdline


def test_kernel_cmdline_with_user_nic() -> None:
    launch = make_launch(full_spec(), generation=0)
    words = kernel_cmdline(launch).split(" ")
    assert "vmcluster.name=web" in words
    assert "vmcluster.gen=0" in words
    assert "vmcluster.interval_ms=250" in words
    assert f"vmcluster.ip={USER_NET_GUEST_IP}" in words
    assert f"vmcluster.gw={USER_NET_GATEWAY}" in words
    assert words.index("console=ttyS0") == 0
    assert (USER_NET_GUEST_IP, USER_NET_GATEWAY) == ("10.0.2.15/24", "10.0.2.2")
    assert single(build_argv(launch), "-append") == " ".join(words)


# ---------------------------------------------------------------------------- Launch checks


def test_launch_requires_one_file_per_disk() -> None:
    spec = VmSpec(name="web", disks=(DiskSpec(name="root", size_bytes=8 * MIB),))
    with pytest.raises(AssertionError):
        make_launch(spec, disk_files=())
    with pytest.raises(AssertionError):
        make_launch(spec, disk_files=(Path("/a"), Path("/b")))


def test_launch_requires_one_port_per_user_nic() -> None:
    spec = VmSpec(name="web", nics=(NicSpec(mode=NicMode.USER, mac="52:54:00:00:00:01"),))
    with pytest.raises(AssertionError):
        make_launch(spec, http_ports=())
    with pytest.raises(AssertionError):
        make_launch(spec, http_ports=(1, 2))


def test_launch_rejects_negative_generation() -> None:
    with pytest.raises(AssertionError):
        make_launch(generation=-1)


# ---------------------------------------------------------------------------- properties

path_text = st.text(
    alphabet=st.characters(
        min_codepoint=32, max_codepoint=0x2FF, exclude_categories=["Cc"], exclude_characters="/"
    ),
    min_size=1,
    max_size=20,
)
names = st.from_regex(r"[a-z](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@st.composite
def launches(draw: st.DrawFn) -> Launch:
    disk_names = draw(st.lists(names, max_size=4, unique=True))
    spec = VmSpec(
        name=draw(names),
        vcpus=draw(st.integers(1, 64)),
        memory_mib=draw(st.integers(64, 4096)),
        disks=tuple(DiskSpec(name=n, size_bytes=8 * MIB) for n in disk_names),
        nics=tuple(
            NicSpec(mode=NicMode.USER, mac=default_mac("vm", i))
            for i in range(draw(st.integers(0, 4)))
        ),
        probe_interval_ms=draw(st.integers(10, 60_000)),
    )

    def path() -> Path:
        return Path("/" + "/".join(draw(st.lists(path_text, min_size=1, max_size=3))))

    return Launch(
        spec=spec,
        kernel=path(),
        initrd=path(),
        disk_files=tuple(path() for _ in spec.disks),
        qmp_socket=path(),
        console_log=path(),
        pidfile=path(),
        accel=draw(st.sampled_from(Accel)),
        generation=draw(st.integers(0, 2**40)),
        http_ports=tuple(draw(st.integers(1024, 65535)) for _ in spec.nics),
        daemonize=draw(st.booleans()),
    )


@settings(max_examples=200)
@given(launches())
def test_argv_properties(launch: Launch) -> None:
    argv = build_argv(launch)
    pairs = parse_argv(argv)  # fails on any standalone argument that is not an option
    options = [o for o, _ in pairs]
    assert ("-daemonize" in options) == launch.daemonize
    assert single(argv, "-cpu") == ("host" if launch.accel is Accel.KVM else "qemu64")

    # Every JSON option parses; devices for disks stop the guest on I/O errors.
    for option, value in pairs:
        if option in JSON_OPTIONS:
            assert value is not None
            assert value.startswith("{")
            assert isinstance(json.loads(value), dict)
    blockdevs = json_objects(argv, "-blockdev")
    assert [b["file"]["filename"] for b in blockdevs] == [str(p) for p in launch.disk_files]
    node_names = {b["node-name"] for b in blockdevs}
    disk_devices = [d for d in json_objects(argv, "-device") if d["driver"] == "virtio-blk-pci"]
    assert len(disk_devices) == len(launch.spec.disks)
    for device in disk_devices:
        assert device["werror"] == "stop"
        assert device["rerror"] == "stop"
        assert device["drive"] in node_names
    netdevs = json_objects(argv, "-netdev")
    forwards = [n["hostfwd"][0]["str"] for n in netdevs]
    assert forwards == [f"tcp:127.0.0.1:{p}-:80" for p in launch.http_ports]

    # QemuOpts strings carry the paths exactly, with no extra keys smuggled in.
    devs = chardevs(argv)
    assert dict(devs["console"])["path"] == str(launch.console_log)
    assert dict(devs["qmp"])["path"] == str(launch.qmp_socket)
    assert [k for k, _ in devs["console"]] == ["file", "id", "path", "append"]
    assert [k for k, _ in devs["qmp"]] == ["socket", "id", "path", "server", "wait"]
    assert qemu_opts(single(argv, "-name")) == [
        ("guest", launch.spec.name),
        ("debug-threads", "on"),
    ]

    # Plain single-value options take the path as it is.
    assert single(argv, "-kernel") == str(launch.kernel)
    assert single(argv, "-initrd") == str(launch.initrd)
    assert single(argv, "-pidfile") == str(launch.pidfile)

    words = single(argv, "-append").split(" ")
    assert f"vmcluster.name={launch.spec.name}" in words
    assert f"vmcluster.gen={launch.generation}" in words
    assert f"vmcluster.interval_ms={launch.spec.probe_interval_ms}" in words
    has_user_net = bool(launch.spec.nics) and launch.spec.nics[0].mode is NicMode.USER
    assert (f"vmcluster.ip={USER_NET_GUEST_IP}" in words) == has_user_net
    assert (f"vmcluster.gw={USER_NET_GATEWAY}" in words) == has_user_net


@pytest.mark.parametrize(
    "hostile",
    ["-daemonize", "-monitor", "-S", "-incoming tcp:0:4444", "--", "-"],
)
def test_hostile_paths_are_never_standalone_options(hostile: str) -> None:
    spec = VmSpec(name="web", disks=(DiskSpec(name="root", size_bytes=8 * MIB),))
    launch = make_launch(
        spec,
        kernel=Path(hostile),
        initrd=Path(hostile + "-initrd"),
        pidfile=Path(hostile + ".pid"),
        disk_files=(Path(hostile + ".raw"),),
        daemonize=False,
    )
    argv = build_argv(launch)
    pairs = parse_argv(argv)
    assert "-daemonize" not in [o for o, _ in pairs]
    assert single(argv, "-kernel") == hostile
    assert single(argv, "-initrd") == hostile + "-initrd"
    assert single(argv, "-pidfile") == hostile + ".pid"
    # The strings only ever appear directly after the option that owns them.
    owners = {hostile: "-kernel", hostile + "-initrd": "-initrd", hostile + ".pid": "-pidfile"}
    for index, arg in enumerate(argv):
        if arg in owners:
            assert argv[index - 1] == owners[arg]
    assert all(hostile + ".raw" not in arg for arg in argv if not arg.startswith("{"))
