"""Kill a save at every line it executes; check the destination after each kill.

``python save_kill_driver.py A.mlpackage B.mlpackage DEST [--no-exchange]``: saves A and B to
DEST in turn; for kill point n = 1, 2, ... a forked child traces the save's own code
(each line of mljax/format/package.py and fs.py, and each file-system call made from any
module) and SIGKILLs itself at its n-th such point.  After each
child the destination must hold exactly the model that was there before or the one being saved
(spec and weight bytes).  Prints one JSON line of counts; exits 1 on the first violation.
"""
import json
import os
import signal
import sys
from pathlib import Path

from mljax.errors import MLJaxError
from mljax.format import fs, package

_TRACED = {os.path.abspath(package.__file__), os.path.abspath(fs.__file__)}


def _content(path: Path):
    """(spec bytes, {weight file: bytes}) of the package at ``path``, via the loader."""
    loaded = package.load_spec(path)
    weights = loaded.model_dir / "weights"
    files = {p.name: p.read_bytes() for p in sorted(weights.iterdir())} if weights.is_dir() else {}
    return loaded.spec.SerializeToString(deterministic=True), files


def _save_killed_at(n: int, spec, weights_from, dest) -> int:
    """Fork a child that saves and SIGKILLs itself at its n-th traced line; its wait status."""
    pid = os.fork()
    if pid == 0:
        count = [0]

        def local(frame, event, arg):
            if event == "line":
                count[0] += 1
                if count[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code.co_filename in _TRACED else None

        def profiler(frame, event, arg):
            # every file-system call (os.*, file object methods), from any module
            if event == "c_call" and (getattr(arg, "__module__", None) == "posix"
                                      or type(getattr(arg, "__self__", None)).__module__ == "_io"):
                local(frame, "line", None)

        sys.settrace(tracer)
        sys.setprofile(profiler)
        try:
            package.save_spec(spec, dest, weights_from=weights_from)
        finally:
            sys.setprofile(None)
            sys.settrace(None)
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def main(argv):
    a, b, dest = (Path(p) for p in argv[:3])
    if "--no-exchange" in argv:
        fs._EXCHANGE = None
    models = [package.load_spec(a), package.load_spec(b)]
    contents = [_content(a), _content(b)]
    package.save_spec(models[0].spec, dest, weights_from=models[0].model_dir)
    current, killed, n = 0, 0, 0
    while True:
        n += 1
        new = 1 - current
        status = _save_killed_at(n, models[new].spec, models[new].model_dir, dest)
        try:
            got = _content(dest)
        except MLJaxError as e:   # no loadable model at the destination
            got = repr(e)
        if got not in (contents[current], contents[new]):
            print(json.dumps({"violation_at_point": n, "found": got if isinstance(got, str) else "another model"}))
            return 1
        if os.WIFSIGNALED(status):
            killed += 1
            current = contents.index(got)
        else:   # the save finished before its n-th line: every point has been tried
            assert got == contents[new], "a finished save left the old model"
            break
    package.save_spec(models[0].spec, dest, weights_from=models[0].model_dir)
    leftovers = sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))
    data_items = sorted(os.listdir(dest / "Data"))
    print(json.dumps({"kill_points": killed, "leftovers": leftovers, "data_items": data_items,
                      "final_is_a": _content(dest) == contents[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
