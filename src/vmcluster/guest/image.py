"""Builds and lists guest images: a Debian cloud kernel and a busybox initramfs with the probe.

The packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``: nothing is
installed on the host and no package scripts run. An image is a directory under the data
directory's ``images/`` holding ``vmlinuz``, ``initrd.img`` and ``image.json``, and ``vmlinux``, the
uncompressed kernel, when it can boot through its PVH entry point (faster: vmcluster.guest.bzimage);
it is assembled in a temporary directory and renamed into place, so a failed build leaves nothing
behind.
"""

import gzip
import hashlib
import json
import lzma
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from vmcluster.core.model import check_name
from vmcluster.errors import ImageBuildError, MissingDependency, NotFound
from vmcluster.guest import cpio, kmod, record
from vmcluster.guest.bzimage import NotAKernel, pvh_kernel
from vmcluster.logs import event, get_logger

log = get_logger(__name__)

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Loaded in dependency order (computed from the modules); button + evdev let the power button
# reach the guest for a graceful stop.
WANTED_MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "button", "evdev"]
IMAGE_FORMAT = 2  # 2: vmlinux for a PVH boot


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageInfo:
    name: str
    path: str
    kernel_package: str
    kernel_version: str
    busybox_package: str
    modules: list[str]
    recipe: str
    built_at: float
    kernel_bytes: int
    initrd_bytes: int
    boot: str = "bzimage"  # "pvh": QEMU boots vmlinux through its PVH entry point

    @property
    def kernel(self) -> Path:
        """What QEMU's -kernel is given."""
        return Path(self.path) / ("vmlinux" if self.boot == "pvh" else "vmlinuz")

    @property
    def initrd(self) -> Path:
        return Path(self.path) / "initrd.img"


def init_script() -> bytes:
    """The probe's /init with the record format's constants filled in."""
    text = resources.files("vmcluster.guest").joinpath("init.sh").read_text()
    text = text.replace("@MAGIC@", record.MAGIC)
    text = text.replace("@RECORD_BASE_SECTOR@", str(record.RECORD_BASE_SECTOR))
    assert re.search(r"@[A-Z_]+@", text) is None, "unfilled placeholder in init.sh"
    return text.encode()


def recipe_hash() -> str:
    """Changes whenever what goes into an image changes (so a stale image is rebuilt)."""
    digest = hashlib.sha256()
    digest.update(f"format={IMAGE_FORMAT};modules={','.join(WANTED_MODULES)};".encode())
    digest.update(init_script())
    return digest.hexdigest()[:16]


def list_images(images_dir: Path) -> list[ImageInfo]:
    infos = []
    for manifest in sorted(images_dir.glob("*/image.json")):
        try:
            infos.append(ImageInfo(**json.loads(manifest.read_text())))
        except (ValueError, TypeError):
            log.warning(event("image.manifest.invalid", path=str(manifest)))
    return infos


def get_image(images_dir: Path, name: str) -> ImageInfo:
    check_name(name, what="image")
    for info in list_images(images_dir):
        if info.name == name:
            return info
    raise NotFound(f"image {name!r} is not built: run 'vmcluster image build'")


def image_is_current(images_dir: Path, name: str) -> bool:
    """True if image ``name`` is built from the current recipe."""
    try:
        return get_image(images_dir, name).recipe == recipe_hash()
    except NotFound:
        return False


def build_image(images_dir: Path, name: str = "probe", *, force: bool = False) -> ImageInfo:
    """Build image ``name`` unless an up-to-date one exists (``force`` rebuilds)."""
    check_name(name, what="image")
    target = images_dir / name
    if not force and image_is_current(images_dir, name):
        return get_image(images_dir, name)
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise MissingDependency(f"{tool} not found: building an image needs a Debian host")
    images_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".build-{name}-", dir=images_dir) as tmp:
        work = Path(tmp)
        kernel_package = _resolve_kernel_package()
        debs = _download(work / "debs", [kernel_package, BUSYBOX_PACKAGE])
        kernel_root = _unpack(debs[kernel_package], work / "kernel")
        busybox_root = _unpack(debs[BUSYBOX_PACKAGE], work / "busybox")
        vmlinuz, kernel_version = _find_kernel(kernel_root)
        modules = _collect_modules(kernel_root / "lib/modules" / kernel_version)
        initrd = _initramfs(busybox_root / "bin/busybox", modules)
        out = work / "out"
        out.mkdir()
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        boot = _write_pvh_kernel(vmlinuz, out / "vmlinux")
        (out / "initrd.img").write_bytes(initrd)
        info = ImageInfo(
            name=name,
            path=str(target),
            kernel_package=kernel_package,
            kernel_version=kernel_version,
            busybox_package=_package_version(debs[BUSYBOX_PACKAGE]),
            modules=[m for m, _ in modules],
            recipe=recipe_hash(),
            built_at=time.time(),
            kernel_bytes=(out / "vmlinuz").stat().st_size,
            initrd_bytes=len(initrd),
            boot=boot,
        )
        (out / "image.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    log.info(
        event(
            "image.built",
            image=name,
            kernel=kernel_version,
            seconds=round(time.monotonic() - started, 1),
        )
    )
    return info


def _write_pvh_kernel(vmlinuz: Path, dest: Path) -> str:
    """Write the uncompressed kernel to ``dest`` if it boots through PVH: "pvh", else
    "bzimage" (and nothing written)."""
    try:
        elf = pvh_kernel(vmlinuz.read_bytes())
    except NotAKernel as exc:
        raise ImageBuildError(f"kernel {vmlinuz.name}: {exc}") from exc
    if elf is None:
        log.info(event("image.pvh.unavailable", kernel=vmlinuz.name))
        return "bzimage"
    dest.write_bytes(elf)
    return "pvh"


def _run(argv: list[str], *, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise ImageBuildError(f"cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImageBuildError(f"{' '.join(argv[:2])} failed: {detail}")
    return str(proc.stdout)


def _resolve_kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    found = re.findall(r"Depends:\s*(linux-image-[\w.+-]+)", out)
    if not found:
        raise ImageBuildError(
            f"cannot resolve {KERNEL_META_PACKAGE}: run 'apt-get update' to refresh package lists"
        )
    return str(found[0])


def _download(dest: Path, packages: list[str]) -> dict[str, Path]:
    dest.mkdir()
    dest.chmod(0o755)  # apt's download sandbox user must be able to write here
    _run(["apt-get", "download", "-q", *packages], cwd=dest)
    debs: dict[str, Path] = {}
    for package in packages:
        matches = sorted(dest.glob(f"{package}_*.deb"))
        if not matches:
            raise ImageBuildError(f"apt-get download gave no .deb for {package}")
        debs[package] = matches[0]
    return debs


def _package_version(deb: Path) -> str:
    """'busybox-static 1:1.35.0-4' for a .deb file."""
    return " ".join(_run(["dpkg-deb", "-W", str(deb)]).split())


def _unpack(deb: Path, dest: Path) -> Path:
    _run(["dpkg-deb", "-x", str(deb), str(dest)])
    return dest


def _find_kernel(root: Path) -> tuple[Path, str]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageBuildError("the kernel package holds no boot/vmlinuz-*")
    version = kernels[0].name.removeprefix("vmlinuz-")
    if not (root / "lib/modules" / version).is_dir():
        raise ImageBuildError(f"the kernel package holds no modules for {version}")
    return kernels[0], version


def _collect_modules(moddir: Path) -> list[tuple[str, bytes]]:
    """The wanted modules and their dependencies, in load order, decompressed."""
    builtin = set()
    builtin_file = moddir / "modules.builtin"
    if builtin_file.exists():
        builtin = {
            Path(line).name.split(".ko")[0].replace("-", "_")
            for line in builtin_file.read_text().split()
        }
    index: dict[str, Path] = {}
    for path in moddir.rglob("*.ko*"):
        index[path.name.split(".ko")[0].replace("-", "_")] = path
    cache: dict[str, bytes] = {}

    def load(name: str) -> bytes:
        if name not in cache:
            if name not in index:
                raise ImageBuildError(f"kernel module {name} is not in the kernel package")
            cache[name] = _read_module(index[name])
        return cache[name]

    def depends_of(name: str) -> list[str]:
        return [] if name in builtin else kmod.dependencies(load(name))

    try:
        order = kmod.load_order(WANTED_MODULES, depends_of)
    except (ValueError, kmod.ModuleFormatError) as exc:
        raise ImageBuildError(f"cannot order kernel modules: {exc}") from exc
    return [(name, load(name)) for name in order if name not in builtin]


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko"):
        return data
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    raise ImageBuildError(f"unsupported module compression: {path.name}")


def _initramfs(busybox: Path, modules: list[tuple[str, bytes]]) -> bytes:
    if not busybox.exists():
        raise ImageBuildError("the busybox-static package holds no bin/busybox")
    entries = [
        cpio.directory("bin"),
        cpio.regular("bin/busybox", busybox.read_bytes(), 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.directory("dev"),
        cpio.char_device("dev/console", 5, 1),
        cpio.directory("etc"),
        cpio.directory("etc/vmcluster"),
        cpio.regular("etc/vmcluster/modules", "".join(f"{m}\n" for m, _ in modules).encode()),
        cpio.directory("lib"),
        cpio.directory("lib/modules"),
        *(cpio.regular(f"lib/modules/{m}.ko", data) for m, data in modules),
        cpio.directory("proc"),
        cpio.directory("run"),
        cpio.directory("sys"),
        cpio.directory("tmp", 0o1777),
        cpio.regular("init", init_script(), 0o755),
    ]
    return gzip.compress(cpio.archive(entries), compresslevel=6, mtime=0)
