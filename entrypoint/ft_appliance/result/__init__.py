"""What a run shows and leaves behind, read from its state files: the story `status` tells, metrics for
dashboards, the loss curve, notifications, and the export for serving. Below run/ on the data path:
the supervisor calls in here, nothing here calls back."""
