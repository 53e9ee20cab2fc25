"""Everything judged before a process starts: read the facts, check them, fold decisions into the Plan."""
