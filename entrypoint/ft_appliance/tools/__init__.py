"""Built on the path above, adding no decisions: the demo layout, the soak, first-start volume, process finder."""
