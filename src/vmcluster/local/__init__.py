"""Single-host mode: VMs on this machine, their state in the data directory."""
