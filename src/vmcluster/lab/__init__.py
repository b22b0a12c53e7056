"""The lab: a whole multi-host cluster on one Linux machine, built from network namespaces."""
