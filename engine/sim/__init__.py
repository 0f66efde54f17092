"""A discrete-event simulator that drives the real scheduler: ``python -m engine.sim``."""
