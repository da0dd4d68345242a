"""Classic Core ML model types as JAX stages: GLM, tree ensembles, SVM, featurizers, kNN.

Importing this package registers the stage builders (``mljax.stage.build_stage`` does so).
"""
from mljax.classic import featurizers, glm, knn, svm, tree  # noqa: F401  (registers builders)

__all__ = ["featurizers", "glm", "knn", "svm", "tree"]
