"""Where the CLI finds the cluster's agents: it composes the API client and the lab.

In order:
1. ``$VMCLUSTER_API`` (comma-separated ``unix:///path`` or ``http://host:port`` URLs) and
   ``$VMCLUSTER_SECRETS`` (the secrets file holding the token);
2. the current lab (set by ``vmcluster lab up``): every node's local API socket;
3. this host's agent: ``unix:///run/vmcluster/api.sock`` and ``/etc/vmcluster/secrets.json``.
"""

import os
from pathlib import Path

from vmcluster.api.client import ApiClient, ClusterTarget
from vmcluster.errors import NotFound
from vmcluster.lab.lab import current_lab_target
from vmcluster.paths import DataDir

DEFAULT_API = "unix:///run/vmcluster/api.sock"
DEFAULT_SECRETS = "/etc/vmcluster/secrets.json"


def find_target(data: DataDir) -> ClusterTarget:
    env_api = os.environ.get("VMCLUSTER_API")
    if env_api:
        urls = [u.strip() for u in env_api.split(",") if u.strip()]
        secrets_file = os.environ.get("VMCLUSTER_SECRETS", DEFAULT_SECRETS)
        endpoints = {f"api{i + 1}": url for i, url in enumerate(urls)}
        return ClusterTarget(endpoints=endpoints, secrets_file=secrets_file)
    lab_target = current_lab_target(data)
    if lab_target is not None:
        return lab_target
    secrets = os.environ.get("VMCLUSTER_SECRETS", DEFAULT_SECRETS)
    if not Path(secrets).exists():
        raise NotFound(
            f"no cluster to talk to: no lab is up, VMCLUSTER_API is not set and {secrets} "
            "does not exist (--local works on this machine's own VMs)"
        )
    return ClusterTarget(endpoints={"local": DEFAULT_API}, secrets_file=secrets)


def api_client(data: DataDir, via: str | None = None) -> ApiClient:
    """A client of the cluster found by :func:`find_target` (``via``: only that node's agent)."""
    return ApiClient(find_target(data), via=via)
