"""The worker runtime: intake, batcher, runner, results, and the worker entry point."""
