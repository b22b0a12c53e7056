"""``vmcluster image``: build and list guest images."""

import datetime

import click

from vmcluster.cli.common import data_dir, output_option, print_json, print_table, stdout
from vmcluster.core.units import human_size
from vmcluster.guest.image import build_image, image_is_current, list_images


@click.group()
def image() -> None:
    """Guest images (a Debian cloud kernel and the probe initramfs)."""


@image.command("build")
@click.option("--name", default="probe", show_default=True, help="Image name.")
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date image exists.")
def build(name: str, force: bool) -> None:
    """Build the probe guest image from Debian packages (apt-get download, no install)."""
    images = data_dir().images
    if force or not image_is_current(images, name):
        stdout.print(f"building image {name} (apt-get download + unpack) ...", markup=False)
    else:
        stdout.print(f"image {name} is up to date (--force rebuilds it)", markup=False)
    info = build_image(images, name, force=force)
    stdout.print(
        f"image {info.name}: kernel {info.kernel_version}, initramfs "
        f"{human_size(info.initrd_bytes)}, modules {' '.join(info.modules)}",
        markup=False,
    )
    stdout.print(f"stored in {info.path}", markup=False)


@image.command("list")
@output_option
def list_(output: str) -> None:
    """List built images."""
    infos = list_images(data_dir().images)
    if output == "json":
        print_json([
            {"name": i.name, "kernel_version": i.kernel_version, "kernel_package": i.kernel_package,
             "modules": i.modules, "path": i.path, "built_at": i.built_at,
             "kernel_bytes": i.kernel_bytes, "initrd_bytes": i.initrd_bytes}
            for i in infos
        ])  # fmt: skip
        return
    print_table(
        ["NAME", "KERNEL", "INITRD", "BUILT", "PATH"],
        [
            (i.name, i.kernel_version, human_size(i.initrd_bytes),
             datetime.datetime.fromtimestamp(i.built_at).strftime("%Y-%m-%d %H:%M"), i.path)
            for i in infos
        ],
    )  # fmt: skip
