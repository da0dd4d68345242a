"""Classifier ML programs (``ct.ClassifierConfig``, the MIL ``classify`` op) predict what PyTorch predicts.

A small CNN with an image input, converted by coremltools with int64 or string class labels, as an
fp32 or fp16 program; checked against PyTorch's softmax through ``mljax.MLModel``, a list predict,
the coremltools bridge and a save/reload.  (The command line: tests/mljax/test_cli.py.)
"""
import numpy as np
import pytest

import mljax
from helpers import tmp_path_for

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
Image = pytest.importorskip("PIL.Image")

from classifiers import INT_LABELS, STR_LABELS, TOL, decisive_images, make_classifier  # noqa: E402

CASES = {"int-fp32": (INT_LABELS, "fp32"), "str-fp16": (STR_LABELS, "fp16"),
         "str-fp32": (STR_LABELS, "fp32"), "int-fp16": (INT_LABELS, "fp16")}


@pytest.fixture(scope="module", params=list(CASES))
def classifier(request):
    labels, precision = CASES[request.param]
    net, path = make_classifier(labels, precision)
    return net, path, labels, precision


def assert_matches_torch(out: dict, expected: np.ndarray, labels, tol: float, label_name="classLabel",
                         probs_name="classLabel_probs"):
    probs = out[probs_name]
    assert list(probs) == labels                          # every label, in the model's order
    assert all(type(k) is type(labels[0]) and type(v) is float for k, v in probs.items())
    np.testing.assert_allclose([probs[k] for k in labels], expected, atol=tol)
    assert out[label_name] == labels[int(np.argmax(expected))]
    assert type(out[label_name]) is type(labels[0])


def test_predict_matches_torch(classifier):
    net, path, labels, precision = classifier
    model = mljax.MLModel(path)
    pictures, expected = decisive_images(net, 6, 10 * TOL[precision])
    for picture, want in zip(pictures, expected):
        assert_matches_torch(model.predict({"image": picture}), want, labels, TOL[precision])
    # a list predict (one vmapped call) gives the same labels and dictionaries
    batch = model.predict([{"image": p} for p in pictures])
    for out, want in zip(batch, expected):
        assert_matches_torch(out, want, labels, TOL[precision])
    # an H x W x C uint8 array is an image too
    assert_matches_torch(model.predict({"image": np.asarray(pictures[0])}), expected[0], labels, TOL[precision])


def test_exact_fp16_and_save_roundtrip(tmp_path):
    net, path = make_classifier(STR_LABELS, "fp16")
    pictures, expected = decisive_images(net, 3, 0.05, seed=1)
    exact = mljax.MLModel(path, compute_precision="declared")   # fp16 arithmetic: softmax rounded to fp16
    for picture, want in zip(pictures, expected):
        assert_matches_torch(exact.predict({"image": picture}), want, STR_LABELS, 5e-3)
    saved = mljax.MLModel(mljax.MLModel(path).save(tmp_path / "again.mlpackage"))
    for picture, want in zip(pictures, expected):
        assert_matches_torch(saved.predict({"image": picture}), want, STR_LABELS, TOL["fp16"])


def test_predicted_feature_name_and_description():
    net, path = make_classifier(STR_LABELS, "fp32", predicted_feature_name="animal")
    model = mljax.MLModel(path)
    spec = model.get_spec().description
    assert (spec.predictedFeatureName, spec.predictedProbabilitiesName) == ("animal", "animal_probs")
    pictures, expected = decisive_images(net, 1, 1e-3)
    out = model.predict({"image": pictures[0]})
    assert list(out) == ["animal", "animal_probs"]
    assert_matches_torch(out, expected[0], STR_LABELS, TOL["fp32"],
                         label_name="animal", probs_name="animal_probs")


def test_coremltools_bridge():
    import mljax.coremltools as bridge
    net, path = make_classifier(INT_LABELS, "fp32")
    pictures, expected = decisive_images(net, 3, 1e-3, seed=2)
    bridge.enable()
    try:
        ct_model = ct.models.MLModel(str(path), skip_model_load=True)
        for picture, want in zip(pictures, expected):
            assert_matches_torch(ct_model.predict({"image": picture}), want, INT_LABELS, TOL["fp32"])
        batch = ct_model.predict([{"image": p} for p in pictures])
        for out, want in zip(batch, expected):
            assert_matches_torch(out, want, INT_LABELS, TOL["fp32"])
    finally:
        bridge.disable()


def test_classify_op_checks_its_classes():
    from mljax.errors import ModelFormatError, OpError
    from mljax.ops.classify import class_labels, classify
    index, probs = classify(np.array([[0.1, 0.7, 0.2]], np.float32), classes=["a", "b", "c"])
    assert int(index) == 1 and probs.shape == (3,)
    with pytest.raises(OpError, match="one class label per probability; found 2 labels"):
        classify(np.array([[0.1, 0.7, 0.2]], np.float32), classes=["a", "b"])
    assert class_labels([np.array(5), np.array(2**40)]) == [5, 2**40]
    with pytest.raises(ModelFormatError, match="all int64 or all string"):
        class_labels([np.array(5), "x"])


@pytest.mark.parametrize("fp16_io", [False, True])
def test_coremltools_own_classifier_cases(fp16_io):
    """coremltools' test_torch_conversion_api classifier cases (its suite needs torchvision to
    import): a ReLU 'classifier' whose 'probabilities' are the ReLU values, with a predicted
    feature name and probability output named (fp32), or fp16 input/output on macOS13 (iOS16)."""
    traced = torch.jit.trace(torch.nn.ReLU().eval(), torch.rand(3))
    if fp16_io:
        model = ct.convert(traced, inputs=[ct.TensorType(shape=(3,), dtype=np.float16)],
                           outputs=[ct.TensorType(dtype=np.float16)],
                           classifier_config=ct.ClassifierConfig(["a", "b", "c"]), convert_to="mlprogram",
                           minimum_deployment_target=ct.target.macOS13)
        label, probs_name = "classLabel", "classLabel_probs"
    else:
        model = ct.convert(traced, inputs=[ct.TensorType(shape=(3,))], convert_to="mlprogram",
                           classifier_config=ct.ClassifierConfig(["a", "b", "c"], predicted_feature_name="class_label",
                                                                 predicted_probabilities_output="var_2"))
        label, probs_name = "class_label", "class_label_probs"
    path = tmp_path_for("relu-classifier.mlpackage")
    model.save(str(path))
    m = mljax.MLModel(path)
    name = next(iter(m.input_description))
    out = m.predict({name: np.array([1.0, -2.0, 3.0])})
    assert list(out) == [label, probs_name]
    assert out[label] == "c"                                   # coremltools' expected label
    assert out[probs_name] == {"a": 1.0, "b": 0.0, "c": 3.0}   # classify maps the values as they are
