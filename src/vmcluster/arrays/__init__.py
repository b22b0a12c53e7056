"""Array drivers: storage systems that hold LUNs and export them over NBD."""
