"""Inputs fetched before any worker starts: hub models and datasets, downloaded once by the head
node into the volume's cache, so that every rank then loads them offline."""
