"""Train updatable Core ML models (and beyond) with Optax; write back valid Core ML models."""
from updatable.population import personalize
from updatable.spec import UpdateSpec, read_update_spec
from updatable.task import UpdateContext, UpdateTask

__all__ = ["UpdateTask", "UpdateContext", "UpdateSpec", "read_update_spec", "personalize"]
