"""NeuralNetwork models (plain, classifier, regressor) run as one JAX function.

Layers are implemented in ``layers_*.py`` and registered by ``NeuralNetworkLayer`` oneof name;
:mod:`mljax.neuralnetwork.builder` registers the stage builder.
"""
from mljax.neuralnetwork import (layers_control, layers_core, layers_legacy, layers_nd,  # noqa: F401
                                 layers_recurrent, layers_shape)
from mljax.neuralnetwork._base import layer_kinds
from mljax.neuralnetwork.builder import build_neuralnetwork_stage, network_function

__all__ = ["build_neuralnetwork_stage", "network_function", "layer_kinds"]
