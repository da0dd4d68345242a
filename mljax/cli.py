"""The ``mljax`` command: info, predict, and the subcommands other packages add (update, demo, bench).

``mljax --help``, ``--version`` and ``info`` never import JAX (2-3 s): the model is only loaded
for ``predict``.  Subcommands outside the core runtime are found through the entry-point group
``mljax.commands`` (``name = "module:add_subcommand"``, see pyproject.toml) and a fallback table
for source checkouts; a command's module is imported only when that command runs, so ``mljax``
never imports ``updatable`` to list or run ``info``/``predict``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from mljax.errors import InputError, MLJaxError

__all__ = ["main"]

_ENTRY_POINT_GROUP = "mljax.commands"
# name -> (entry point value, one-line help): used when the installed metadata does not list them
_FALLBACK = {
    "update": ("updatable.cli:add_subcommand", "train an updatable model on data from an .npz file"),
    "demo": ("updatable.cli:add_subcommand", "personalize the embedded digits model (no arguments needed)"),
    "bench": ("mljax.bench_cli:add_subcommand", "load time, first prediction, latency and throughput"),
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_ARRAY_SUFFIXES = {".npy", ".npz", ".json"}


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("mljax")
    except Exception:   # noqa: BLE001 - not installed: the source tree's version
        from mljax import __version__
        return __version__


def _commands() -> dict[str, tuple[str, str]]:
    """External subcommands: ``{name: (module:function, help)}``, installed entry points first."""
    found = dict(_FALLBACK)
    try:
        from importlib.metadata import entry_points
        for ep in entry_points(group=_ENTRY_POINT_GROUP):
            help_text = found.get(ep.name, (None, f"(from {ep.value.split(':')[0]})"))[1]
            found[ep.name] = (ep.value, help_text)
    except Exception:   # noqa: BLE001 - broken metadata must not break the command
        pass
    return found


def _add_external(sub, name: str, target: str) -> bool:
    """Import ``target``'s module and let it add its subcommand; False when it is not installed."""
    module, _, function = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            return False     # the package is not installed
        raise                # it is, but one of its own imports failed: say so
    getattr(mod, function or "add_subcommand")(sub, name)
    return True


# --- info --------------------------------------------------------------------------------------
def _cmd_info(args) -> int:
    from mljax.inspect import describe
    print(describe(args.model, mil=args.mil))
    return 0


# --- predict: reading inputs ---------------------------------------------------------------------
def _input_specs(args) -> dict:
    """The model's input descriptions, from the spec alone (no JAX), to read files by input kind."""
    from mljax.features import feature_specs
    from mljax.format.package import load_spec
    desc = load_spec(args.model).spec.description
    name = args.function_name or desc.defaultFunctionName
    for f in desc.functions:
        if f.name == name:
            desc = f
    return feature_specs(desc.input)


def _split_pair(pair: str, option: str) -> tuple[str, str]:
    if "=" not in pair:
        raise InputError(f"{option} expects NAME=FILE; found {pair!r}")
    name, file = pair.split("=", 1)
    return name, file


def _read_value(name: str, path: Path, specs: dict, option: str = "--input", resize: bool = False):
    """One input value from a file: .npy/.npz arrays, .json values, images (Pillow) for image inputs."""
    if not path.is_file():
        raise InputError(f"{option} {name}: file {path} does not exist")
    spec = specs.get(name)
    suffix = path.suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        return _read_image(name, path, spec, option, resize)
    if suffix == ".json":
        try:
            value = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{option} {name}: {path} is not valid JSON ({e})") from None
        return _from_json(value, spec)
    import numpy as np
    try:
        value = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"{option} {name}: {path} is not a NumPy .npy/.npz file ({e}); expected .npy, .npz, "
                         f".json or an image ({', '.join(sorted(_IMAGE_SUFFIXES))})") from None
    if hasattr(value, "files"):
        with value:
            if name in value.files:
                return value[name]
            if len(value.files) == 1:
                return value[value.files[0]]
            raise InputError(f"{option} {name}: {path} holds arrays {value.files}; expected one array, or "
                             f"one named {name!r}")
    return value


def _from_json(value, spec):
    """A JSON value as the feature it describes: numbers/lists -> arrays, strings and dicts as they are."""
    import numpy as np
    if isinstance(value, (str, dict)) or spec is None or spec.kind in ("string", "dictionary", "sequence"):
        return value
    try:
        return np.asarray(value, dtype=spec.dtype if spec.dtype is not None else None)
    except (ValueError, TypeError) as e:
        raise InputError(f"input {spec.name!r}: the JSON value is no {spec} ({e})") from None


def _read_image(name: str, path: Path, spec, option: str, resize: bool = False):
    if spec is None or spec.kind != "image":
        kind = "unknown to the model" if spec is None else f"a {spec}"
        raise InputError(f"{option} {name}: {path} is an image file, but input {name!r} is {kind}; image files "
                         f"fit image inputs only (give .npy, .npz or .json for arrays)")
    try:
        from PIL import Image
    except ImportError:
        raise InputError(f"{option} {name}: reading the image {path} needs Pillow, which is not installed "
                         f"(pip install pillow)") from None
    try:
        with Image.open(path) as im:
            im.load()
            mode = "L" if spec.color_space and spec.color_space.startswith("GRAYSCALE") else "RGB"
            im = im.convert(mode) if im.mode != mode else im.copy()
    except OSError as e:
        raise InputError(f"{option} {name}: {path} is not a readable image ({e})") from None
    h, w = spec.shape or (0, 0)
    if h and w and not (spec.ranges or spec.enumerated) and im.size != (w, h):
        if not resize:
            raise InputError(f"{option} {name}: {path} is {im.size[0]} x {im.size[1]} (width x height); input "
                             f"{name!r} takes {w} x {h}: resize it, or pass --resize")
        im = im.resize((w, h), Image.BILINEAR)
    return im


def _load_inputs(pairs: list[str], specs: dict, resize: bool = False) -> dict:
    inputs = {}
    for pair in pairs:
        name, file = _split_pair(pair, "--input")
        inputs[name] = _read_value(name, Path(file), specs, resize=resize)
    return inputs


def _batch_samples(spec_text: str, specs: dict, shared: dict, resize: bool = False) -> tuple[list[str], list[dict]]:
    """``--batch``: (sample names, input dicts) from a folder of files (one sample each, for one
    input) or an .npz whose arrays (one per input) share a leading sample axis."""
    import numpy as np
    name, path = spec_text.split("=", 1) if "=" in spec_text else (None, spec_text)
    path = Path(path)
    free = [n for n in specs if n not in shared]
    if path.is_dir():
        if name is None:
            if not free:
                raise InputError(f"--batch {path}: every input of the model {list(specs)} is given by --input; "
                                 f"name the input the files are for (--batch NAME={path})")
            if len(free) != 1:
                raise InputError(f"--batch {path}: the model has inputs {list(specs)}; say which one the files "
                                 f"are for (--batch NAME={path}) and give the others with --input")
            name = free[0]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in
                       _IMAGE_SUFFIXES | _ARRAY_SUFFIXES - {".npz"} and not p.name.startswith("."))
        if not files:
            raise InputError(f"--batch {path}: expected image, .npy or .json files in the folder; found none")
        return [p.name for p in files], [{**shared, name: _read_value(name, p, specs, "--batch", resize)} for p in files]
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise InputError(f"--batch expects a folder of samples or an .npz of arrays with a leading sample "
                         f"axis; found {path}" + ("" if path.exists() else " (does not exist)"))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError) as e:
        raise InputError(f"--batch {path} is not a NumPy .npz file ({e})") from None
    missing = [n for n in free if n not in arrays]
    if missing:
        raise InputError(f"--batch {path}: expected arrays named after the inputs {free}; missing {missing} "
                         f"(found {sorted(arrays)})")
    lengths = {n: len(arrays[n]) for n in free if np.ndim(arrays[n])}
    if len(set(lengths.values())) != 1 or len(lengths) != len(free):
        raise InputError(f"--batch {path}: every input array needs the same leading sample axis; found "
                         f"lengths {lengths}")
    count = next(iter(lengths.values()))
    return [str(i) for i in range(count)], [{**shared, **{n: arrays[n][i] for n in free}} for i in range(count)]


# --- predict: writing outputs --------------------------------------------------------------------
def _jsonable(value):
    import numpy as np
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "mode") and hasattr(value, "size") and hasattr(value, "getdata"):   # PIL image
        value = np.asarray(value)
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def _as_arrays(name: str, value) -> dict:
    """An output as .npz arrays: a probability dict -> ``name`` (probabilities in label order) and
    ``name.labels``; labels, strings and images -> arrays."""
    import numpy as np
    if isinstance(value, dict):
        return {name: np.array(list(value.values()), np.float64), f"{name}.labels": np.array(list(value))}
    return {name: np.asarray(value)}


def _save_outputs(path: str, results: list[dict], batched: bool) -> list[str]:
    import numpy as np
    columns: dict[str, list] = {}
    for out in results:
        for name, value in out.items():
            for key, arr in _as_arrays(name, value).items():
                columns.setdefault(key, []).append(arr)
    arrays = {}
    for key, values in columns.items():
        if not batched or key.endswith(".labels"):
            arrays[key] = values[0]
        else:
            try:
                arrays[key] = np.stack(values)
            except ValueError:
                raise InputError(f"--output: output {key!r} has different shapes across the batch; "
                                 f"write it per sample (--json) instead") from None
    np.savez(path, **arrays)
    return list(arrays)


def _print_human(outputs: dict, prefix: str = "") -> None:
    import numpy as np
    for name, value in outputs.items():
        if isinstance(value, dict):
            top = sorted(value.items(), key=lambda kv: -kv[1])[:5]
            shown = ", ".join(f"{k!r}: {v:.4f}" for k, v in top) + (", ..." if len(value) > 5 else "")
            print(f"{prefix}{name}: {{{shown}}}")
        elif isinstance(value, (str, int, float)):
            print(f"{prefix}{name}: {value!r}")
        else:
            a = np.asarray(value)
            print(f"{prefix}{name}: {a.dtype} {a.shape}" + ("" if a.size > 16 else f" {a.tolist()}"))


# --- predict ---------------------------------------------------------------------------------------
def _cmd_predict(args) -> int:
    from mljax import cache
    if args.threads is not None:
        from mljax.cpu import set_cpu_threads
        set_cpu_threads(args.threads)            # before MLModel starts JAX's CPU backend
    if args.keep_memory:
        from mljax.cpu import retain_freed_memory
        if not retain_freed_memory():            # also before JAX starts
            print("mljax: --keep-memory has no effect here (not glibc)", file=sys.stderr)
    if args.no_cache:
        return _predict(args)
    with cache.using():      # an unwritable folder only costs the cache (a warning), never the prediction
        return _predict(args)


def _predict(args) -> int:
    specs = _input_specs(args)                   # files are read and checked before JAX loads
    shared = _load_inputs(args.input, specs, args.resize)
    names, samples = _batch_samples(args.batch, specs, shared, args.resize) if args.batch else (None, None)
    from mljax import MLModel
    model = MLModel(args.model, compute_precision=args.compute_precision, function_name=args.function_name)
    if samples is None:
        results = [model.predict(shared)]
    else:
        results = _predict_batch(model, samples, progress=not args.no_progress)
    if args.output:
        written = _save_outputs(args.output, results, batched=samples is not None)
        print(f"wrote {', '.join(written)} to {args.output}", file=sys.stderr if args.json else sys.stdout)
    if args.json:
        if samples is None:
            print(json.dumps(_jsonable(results[0])))
        else:
            print(json.dumps([{"sample": n, "outputs": _jsonable(r)} for n, r in zip(names, results)]))
    elif samples is None:
        _print_human(results[0])
    else:
        for n, r in zip(names, results):
            print(f"[{n}]")
            _print_human(r, "  ")
    return 0


def _predict_batch(model, samples: list[dict], *, progress: bool, chunk: int = 256) -> list[dict]:
    """List predicts of ``chunk`` samples (each one vmapped call) under a tqdm bar counting samples."""
    from tqdm.auto import tqdm
    results = []
    with tqdm(total=len(samples), unit="sample", desc="mljax predict", disable=not progress,
              file=sys.stderr) as bar:
        for start in range(0, len(samples), chunk):
            part = samples[start:start + chunk]
            results += model.predict(part)
            bar.update(len(part))
    return results


# --- the parser ----------------------------------------------------------------------------------------
def _parser(command: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mljax", description="Run and update Core ML models anywhere JAX runs.")
    p.add_argument("--version", action="version", version=f"mljax {_version()}",
                   help="print mljax's version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="describe a model: type, inputs/outputs, update parameters, ops, weights")
    info.add_argument("model", help=".mlpackage folder or .mlmodel file")
    info.add_argument("--mil", action="store_true",
                      help="also print the MIL text of the ML program (of each ML-program stage of a pipeline)")
    info.set_defaults(func=_cmd_info)
    _predict_parser(sub)
    for name, (target, help_text) in _commands().items():
        if name != command:      # listed in --help; its module is imported only when it runs
            sub.add_parser(name, help=help_text, add_help=False)
        elif not _add_external(sub, name, target):
            raise MLJaxError(f"the command {name!r} comes from {target.split(':')[0]}, which is not installed")
    return p


def _predict_parser(sub) -> None:
    pred = sub.add_parser("predict", help="predict from .npy/.npz/.json/image inputs, one sample or a batch",
                          description="Predict with a Core ML model. Image inputs take .png/.jpg files "
                                      "(needs Pillow); arrays come from .npy, .npz or .json files.")
    pred.add_argument("model", help=".mlpackage folder or .mlmodel file")
    pred.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE",
                      help="an input from a file: .npy, .npz (the array named NAME, or its only array), "
                           ".json (numbers, lists, strings, dicts) or an image (.png, .jpg ...) for image "
                           "inputs; repeat for each input. With --batch, these inputs are shared by all samples")
    pred.add_argument("--batch", "-b", metavar="[NAME=]DIR|FILE.npz",
                      help="predict many samples: every file of a folder is one sample of input NAME (the "
                           "model's only input when omitted), or an .npz holds one array per input with a "
                           "leading sample axis; shows a progress bar")
    pred.add_argument("--resize", action="store_true",
                      help="resize image files to the image input's size (bilinear; default: a different size "
                           "is an error)")
    pred.add_argument("--json", action="store_true",
                      help="print the outputs as JSON (arrays as lists, class probabilities as a dict; a batch "
                           "as a list of {sample, outputs})")
    pred.add_argument("--output", "-o", metavar="OUT.npz",
                      help="write every output to an .npz (a probability dict as NAME, the probabilities, and "
                           "NAME.labels; a batch stacked along a first sample axis)")
    pred.add_argument("--function-name", metavar="NAME", help="the function of a multifunction ML program")
    pred.add_argument("--compute-precision", choices=["auto", "declared", "float16", "float32"], default="auto",
                      help="auto (default): fp16 programs compute in fp32 on the CPU, declared types elsewhere; "
                           "declared/float16: exact declared types; float32: always fp32")
    pred.add_argument("--no-cache", action="store_true",
                      help="do not keep compiled executables in $MLJAX_CACHE_DIR or ~/.cache/mljax "
                           "(the cache makes a second predict of the same model start in ~0.1 s)")
    pred.add_argument("--no-progress", action="store_true", help="no progress bar for --batch")
    pred.add_argument("--threads", type=int, metavar="N",
                      help="CPU threads for XLA (default: one per core); 1 runs every op in sequence on one "
                           "thread, the least CPU time per prediction (see mljax.set_cpu_threads)")
    pred.add_argument("--keep-memory", action="store_true",
                      help="keep freed memory for the next call instead of returning it to the kernel: less "
                           "CPU time for large batches, a process that keeps its peak heap "
                           "(see mljax.retain_freed_memory)")
    pred.set_defaults(func=_cmd_predict)


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is no option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    try:
        args = _parser(command).parse_args(argv)
    except SystemExit as e:          # --help, --version (0) and usage errors (2): an exit status
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    except MLJaxError as e:
        print(f"mljax {command}: error: {e}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except MLJaxError as e:
        print(f"mljax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
