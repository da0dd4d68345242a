"""Updatable models made with coremltools' own NeuralNetworkBuilder, for the update tests."""
from __future__ import annotations

import numpy as np

from helpers import tmp_path_for


def dense_classifier(n_in=6, n_hidden=5, labels=("a", "b", "c"), *, optimizer="sgd", lr=0.05,
                     batch=4, momentum=0.0, epochs=3, seed=0, hidden_updatable=True, shuffle=True):
    """features -> dense(+relu) -> dense -> softmax, a classifier with string labels; saved .mlmodel."""
    import coremltools as ct
    from coremltools.models import datatypes
    from coremltools.models.neural_network import AdamParams, NeuralNetworkBuilder, SgdParams

    rng = np.random.default_rng(seed)
    w1 = rng.normal(scale=0.5, size=(n_hidden, n_in)).astype(np.float32)
    b1 = rng.normal(scale=0.1, size=n_hidden).astype(np.float32)
    w2 = rng.normal(scale=0.5, size=(len(labels), n_hidden)).astype(np.float32)
    b2 = np.zeros(len(labels), np.float32)
    b = NeuralNetworkBuilder([("features", datatypes.Array(n_in))], [("probs", None)], mode="classifier")
    b.add_inner_product("dense1", W=w1, b=b1, input_channels=n_in, output_channels=n_hidden,
                        has_bias=True, input_name="features", output_name="h")
    b.add_activation("relu1", "RELU", "h", "hr")
    b.add_inner_product("dense2", W=w2, b=b2, input_channels=n_hidden, output_channels=len(labels),
                        has_bias=True, input_name="hr", output_name="logits")
    b.add_softmax("softmax", "logits", "probs")
    b.set_class_labels(list(labels), predicted_feature_name="label", prediction_blob="probs")
    b.make_updatable(["dense1", "dense2"] if hidden_updatable else ["dense2"])
    b.set_categorical_cross_entropy_loss(name="loss", input="probs")
    if optimizer == "sgd":
        b.set_sgd_optimizer(SgdParams(lr=lr, batch=batch, momentum=momentum))
    else:
        b.set_adam_optimizer(AdamParams(lr=lr, batch=batch))
    b.set_epochs(epochs, allowed_set=list(range(1, 101)))
    b.nn_spec.updateParams.shuffle.defaultValue = shuffle
    path = tmp_path_for("updatable.mlmodel")
    ct.models.utils.save_spec(b.spec, str(path))
    return path, dict(w1=w1, b1=b1, w2=w2, b2=b2)
