"""The on-disk protocol shared by supervisor and workers: layout, typed records, files, locks."""
