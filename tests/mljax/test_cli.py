"""The ``mljax`` command as a new user meets it: predict from files and images, batches, JSON,
``--output``, ``--version``, help on every option, ``info``; and what it does not import.

Classifier outputs are checked against PyTorch (the model of tests/mljax/test_classifier.py).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mljax
from mljax.cli import main

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
Image = pytest.importorskip("PIL.Image")

from classifiers import STR_LABELS, TOL, decisive_images, make_classifier, torch_probabilities  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def run_cli(*args, check=True):
    run = subprocess.run([sys.executable, "-m", "mljax", *map(str, args)], capture_output=True, text=True,
                         env=ENV, cwd=ROOT)
    if check:
        assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """An fp32 string-label image classifier, 4 decisive PNG photos of it, and torch's probabilities."""
    net, path = make_classifier(STR_LABELS, "fp32")
    pictures, expected = decisive_images(net, 4, 1e-3, seed=3)
    folder = tmp_path_factory.mktemp("photos")
    for i, picture in enumerate(pictures):
        picture.save(folder / f"photo{i}.png")
    return path, folder, expected, net


def check_outputs(outputs: dict, want: np.ndarray):
    probs = outputs["classLabel_probs"]
    assert list(probs) == STR_LABELS
    np.testing.assert_allclose([probs[k] for k in STR_LABELS], want, atol=TOL["fp32"])
    assert outputs["classLabel"] == STR_LABELS[int(np.argmax(want))]


def test_predict_image_json_matches_torch(classifier):
    path, folder, expected, _ = classifier
    run = run_cli("predict", path, "--input", f"image={folder / 'photo0.png'}", "--json")
    check_outputs(json.loads(run.stdout), expected[0])


def test_batch_over_a_folder_with_progress_json_and_every_output(classifier, tmp_path):
    path, folder, expected, _ = classifier
    out = tmp_path / "out.npz"
    run = run_cli("predict", path, "--batch", folder, "--json", "--output", out)
    samples = json.loads(run.stdout)
    assert [s["sample"] for s in samples] == [f"photo{i}.png" for i in range(4)]
    for sample, want in zip(samples, expected):
        check_outputs(sample["outputs"], want)
    assert "4/4" in run.stderr and "sample" in run.stderr          # the tqdm bar counts samples
    with np.load(out) as saved:                                     # every output kept, probabilities too
        assert list(saved["classLabel_probs.labels"]) == STR_LABELS
        np.testing.assert_allclose(saved["classLabel_probs"], expected, atol=TOL["fp32"])
        assert list(saved["classLabel"]) == [STR_LABELS[i] for i in np.argmax(expected, 1)]


def test_batch_npz_json_and_npy_inputs(tmp_path):
    """A MIL program with two array inputs: --batch over an .npz of samples, --input from .json and .npy."""
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 3)), mb.TensorSpec(shape=(3,))],
                opset_version=ct.target.iOS15)
    def prog(x, w):
        return mb.add(x=mb.mul(x=x, y=w), y=1.0, name="y")

    path = tmp_path / "affine.mlpackage"
    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS15,
               compute_precision=ct.precision.FLOAT32).save(str(path))
    rng = np.random.default_rng(0)
    xs, w = rng.random((5, 2, 3)).astype(np.float32), np.array([1.0, -2.0, 0.5], np.float32)
    np.savez(tmp_path / "many.npz", x=xs)
    (tmp_path / "w.json").write_text(json.dumps(w.tolist()))
    run = run_cli("predict", path, "--batch", tmp_path / "many.npz", "--input", f"w={tmp_path / 'w.json'}",
                  "--json", "--no-progress")
    got = np.array([s["outputs"]["y"] for s in json.loads(run.stdout)])
    np.testing.assert_allclose(got, xs * w + 1, rtol=1e-6)
    np.save(tmp_path / "x.npy", xs[0])
    out = tmp_path / "one.npz"
    run_cli("predict", path, "--input", f"x={tmp_path / 'x.npy'}", "--input", f"w={tmp_path / 'w.json'}",
            "--output", out)
    with np.load(out) as saved:
        np.testing.assert_allclose(saved["y"], xs[0] * w + 1, rtol=1e-6)
    # an image file for an array input: an mljax error naming both, no traceback
    Image.fromarray(np.zeros((3, 2), np.uint8)).save(tmp_path / "x.png")
    bad = run_cli("predict", path, "--input", f"x={tmp_path / 'x.png'}", "--input", f"w={tmp_path / 'w.json'}",
                  check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "x.png is an image file, but input 'x' is a MultiArray (Float32 2 x 3)" in bad.stderr


def test_image_input_needs_pillow(classifier, monkeypatch, capsys):
    path, folder, _, _ = classifier
    monkeypatch.setitem(sys.modules, "PIL", None)                  # as if Pillow were not installed
    assert main(["predict", str(path), "--input", f"image={folder / 'photo0.png'}"]) == 2
    assert "needs Pillow, which is not installed (pip install pillow)" in capsys.readouterr().err


def test_version_help_and_info_do_not_import_jax(classifier):
    path, _, _, _ = classifier
    code = ("import sys, contextlib, io\nfrom mljax.cli import main\n"
            "for argv in (['--version'], ['--help'], ['predict', '--help'], ['info', sys.argv[1]]):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main(argv)\n"
            "print(sorted(m for m in ('jax', 'updatable', 'ml_dtypes') if m in sys.modules))")   # ml_dtypes: ~1-2 s
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=ENV, cwd="/")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    version = run_cli("--version")
    assert version.stdout.strip() == f"mljax {mljax.__version__}"


def test_import_cli_does_not_import_updatable_and_commands_are_found():
    code = "import sys, mljax.cli; print('updatable' in sys.modules, 'jax' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd="/")
    assert run.stdout.split() == ["False", "False"], run.stderr
    from mljax.cli import _commands
    commands = _commands()
    assert {"update", "demo", "bench"} <= set(commands)
    assert commands["update"][0] == "updatable.cli:add_subcommand"
    # the entry points pyproject.toml declares are the ones the fallback table knows
    import tomllib
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["mljax.commands"]
    assert declared == {name: target for name, (target, _) in commands.items() if name in declared}
    update_help = run_cli("update", "--help").stdout
    assert "--data" in update_help and "--epochs" in update_help


def test_every_option_has_help():
    from mljax.cli import _parser
    for command in ("info", "predict", "update", "demo", "bench"):
        parser = _parser(command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"mljax {command}: option {action.option_strings or action.dest} has no help"
    for action in _parser(None)._actions:
        assert action.help or action.dest == "command"


def test_info_of_an_updatable_pipeline_and_weight_bytes(tmp_path):
    import shutil
    from updatable.demo import demo_model_path
    text = run_cli("info", demo_model_path(), "--mil").stdout
    copy = shutil.copytree(demo_model_path(), tmp_path / "copy.mlpackage")   # coremltools rewrites Manifest.json
    spec = ct.utils.load_spec(str(copy))
    nn = spec.pipelineClassifier.pipeline.models[-1].neuralNetworkClassifier
    u = nn.updateParams
    assert "training inputs:" in text
    for feature in spec.description.trainingInput:
        assert f"\n  {feature.name}: " in text
    loss = u.lossLayers[0].categoricalCrossEntropyLossLayer
    assert f"categorical cross-entropy; input {loss.input}, target {loss.target}" in text
    sgd = u.optimizer.sgdOptimizer
    assert f"learning rate: {sgd.learningRate.defaultValue} (allowed {sgd.learningRate.range.minValue} .. " \
           f"{sgd.learningRate.range.maxValue})" in text
    epochs = sorted(u.epochs.set.values)
    assert f"epochs: {u.epochs.defaultValue} (allowed {{{epochs[0]}..{epochs[-1]}}})" in text
    assert f"shuffle: {str(u.shuffle.defaultValue).lower()}" in text
    # --mil prints the ML-program stage inside the pipeline
    assert "# model/features" in text and "func main<CoreML7>" in text and "linear(" in text
    # weight bytes: the blob file plus the network's inline weights (float values, 4 bytes each)
    blob = sum(p.stat().st_size for p in (demo_model_path() / "Data" / "com.apple.CoreML" / "weights").iterdir())
    inline = sum(4 * len(layer.innerProduct.weights.floatValue) + 4 * len(layer.innerProduct.bias.floatValue)
                 for layer in nn.layers if layer.WhichOneof("layer") == "innerProduct")
    assert f"weight bytes: {blob + inline}\n" in text


def test_info_weight_bytes_of_a_neuralnetwork_mlmodel(tmp_path):
    from coremltools.models import datatypes
    from coremltools.models.neural_network import NeuralNetworkBuilder
    builder = NeuralNetworkBuilder([("x", datatypes.Array(5))], [("y", None)])
    w = np.arange(15, dtype=np.float32).reshape(3, 5)
    builder.add_inner_product("ip", w, np.ones(3, np.float32), 5, 3, True, "x", "y")
    path = tmp_path / "nn.mlmodel"
    ct.models.MLModel(builder.spec, skip_model_load=True).save(str(path))
    text = run_cli("info", path).stdout
    assert f"weight bytes: {w.nbytes + 3 * 4}\n" in text          # 15 weights + 3 biases, float32


def test_supported_ops_table_is_up_to_date():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_supported_ops.py"), "--check"],
                         capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr


def test_a_command_whose_package_is_missing(monkeypatch, capsys):
    import mljax.cli as cli
    monkeypatch.setitem(cli._FALLBACK, "train", ("nopackage_xyz.cli:add_subcommand", "train something"))
    assert "train" in cli._commands()
    assert main(["train", "--epochs", "3"]) == 2
    assert "the command 'train' comes from nopackage_xyz.cli, which is not installed" in capsys.readouterr().err


def test_entry_point_commands_are_found_and_imported_only_when_run(tmp_path, monkeypatch, capsys):
    """A package adds `mljax hello` through the entry-point group mljax.commands."""
    import importlib.metadata
    (tmp_path / "hello_plugin.py").write_text(
        "def add_subcommand(sub, name):\n"
        "    p = sub.add_parser(name, help='say hello')\n"
        "    p.add_argument('--who', default='world', help='whom to greet')\n"
        "    p.set_defaults(func=lambda args: print(f'hello {args.who}') or 0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    point = importlib.metadata.EntryPoint(name="hello", value="hello_plugin:add_subcommand", group="mljax.commands")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [point] if kw.get("group") == "mljax.commands" else real(**kw))
    assert main(["--help"]) == 0
    assert "hello" in capsys.readouterr().out and "hello_plugin" not in sys.modules
    assert main(["hello", "--who", "mljax"]) == 0
    assert capsys.readouterr().out == "hello mljax\n"


def test_resize_images_to_the_input_size(classifier, tmp_path, capsys):
    path, _, _, net = classifier
    photo = Image.fromarray(np.random.default_rng(7).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    photo.save(tmp_path / "big.png")
    assert main(["predict", str(path), "-i", f"image={tmp_path / 'big.png'}", "--no-cache"]) == 2
    assert "big.png is 40 x 30 (width x height); input 'image' takes 12 x 12: resize it, or pass --resize" \
        in capsys.readouterr().err
    assert main(["predict", str(path), "-i", f"image={tmp_path / 'big.png'}", "--resize", "--json", "--no-cache"]) == 0
    want = torch_probabilities(net, [photo.resize((12, 12), Image.BILINEAR)])[0]
    probs = json.loads(capsys.readouterr().out)["classLabel_probs"]
    np.testing.assert_allclose([probs[k] for k in STR_LABELS], want, atol=TOL["fp32"])
