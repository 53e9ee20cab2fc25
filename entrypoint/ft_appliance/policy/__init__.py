"""Pure decisions (no I/O): which checkpoint, retry or give up, hang or not, progress, profile, autotune."""
