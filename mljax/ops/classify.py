"""The MIL ``classify`` op (coremltools ``defs/iOS15/classify.py``): what makes an ML program a classifier.

``classify(probabilities, classes)`` returns the predicted class label and the
``{label: probability}`` dictionary.  Strings and dictionaries are no JAX values, so inside
the lowered function the op yields the *class index* (int32, the first maximum, as
``argmax``) and the probabilities flattened to one vector (float32); the ML program stage
maps them to the label and the dictionary on the host (:func:`class_outputs`), as Core ML
returns them.  The op's outputs can only be function outputs (coremltools' rule).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mljax.errors import ModelFormatError, OpError
from mljax.ops._registry import register

__all__ = ["classify", "class_labels", "class_outputs"]


@register("classify")
def classify(probabilities, *, classes):
    """``(index of the largest probability, probabilities as one fp32 vector)``; ``classes``
    (int64 or string labels) must hold one label per probability."""
    n = int(np.prod(np.shape(probabilities)))
    if len(classes) != n:
        raise OpError(f"classify: expected one class label per probability; found {len(classes)} "
                      f"labels for probabilities of shape {tuple(np.shape(probabilities))}")
    flat = jnp.reshape(probabilities, (-1,)).astype(jnp.float32)
    return jnp.argmax(flat).astype(jnp.int32), flat


def class_labels(classes) -> list:
    """The ``classes`` const of a ``classify`` op as Python labels (``int`` or ``str``)."""
    labels = []
    for value in classes:
        item = value.item() if isinstance(value, np.ndarray) and value.size == 1 else value
        if isinstance(item, bytes):
            item = item.decode()
        if isinstance(item, (np.integer, bool)):
            item = int(item)
        if not isinstance(item, (int, str)):
            raise ModelFormatError(f"classify: expected int64 or string class labels; found "
                                   f"{type(item).__name__} {item!r}")
        labels.append(item)
    if labels and len({type(v) for v in labels}) > 1:
        raise ModelFormatError("classify: expected class labels all int64 or all string; found a mix")
    return labels


def class_outputs(labels: list, label_name: str | None, probs_name: str | None):
    """A host postprocess: ``label_name``'s class index -> its label, ``probs_name``'s vector ->
    ``{label: probability}`` (float, as coremltools returns them)."""
    def postprocess(outputs: dict) -> dict:
        outputs = dict(outputs)
        if label_name in outputs:
            outputs[label_name] = labels[int(np.asarray(outputs[label_name]).reshape(-1)[0])]
        if probs_name in outputs:
            p = np.asarray(outputs[probs_name], np.float64).reshape(-1)
            if p.size != len(labels):
                raise ModelFormatError(f"classifier output {probs_name!r}: {p.size} probabilities for "
                                       f"{len(labels)} class labels; expected one per label")
            outputs[probs_name] = {label: float(v) for label, v in zip(labels, p)}
        return outputs
    return postprocess
