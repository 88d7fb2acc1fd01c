"""Reports over run directories: the layer above the application (it reads what bench, claims and run attached)."""
