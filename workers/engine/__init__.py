"""The engine: typed deliveries from any source, batches across jobs, outcomes to a sink."""
