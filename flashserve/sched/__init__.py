"""flashserve.sched."""
