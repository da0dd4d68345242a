"""Users per second: ``updatable.personalize`` vs a loop of ``UpdateTask``s vs a PyTorch loop (CPU).

    python bench/population.py                      # 256 users, 20 samples each, the model's 20 epochs
    python bench/population.py --users 64 --epochs 5 --rounds 2   # a quick check

The model is the embedded digits pipeline (frozen ML program -> updatable classifier head,
SGD with momentum, mini-batches of 10).  Every user trains on its own digits with Core ML's
semantics.  Times are after compilation (each runner runs the whole population once first),
the median of ``--rounds`` rounds, wall clock.  The PyTorch loop trains the same head
(``nn.Linear``, ``torch.optim.SGD``, the same mini-batches) on embeddings computed beforehand
by mljax, outside its timing, so it is a lower bound on a PyTorch implementation's cost.
Prints a markdown table; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _users(n_users: int, samples: int, seed: int = 0):
    from updatable.demo import demo_data
    x, y = demo_data()
    rng = np.random.default_rng(seed)
    picks = [rng.choice(len(x), samples, replace=False) for _ in range(n_users)]
    return x, y, [{"pixels": x[p], "digit": y[p]} for p in picks], picks


def _time(fn, rounds: int) -> float:
    fn()                                    # compile / warm up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=256)
    p.add_argument("--samples", type=int, default=20, help="training samples per user")
    p.add_argument("--epochs", type=int, default=None, help="default: the model's (20)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loop-users", type=int, default=None,
                   help="users timed in the UpdateTask and torch loops (default: all; users/s is per user)")
    args = p.parse_args(argv)

    import jax
    import torch

    import mljax
    import updatable
    from updatable.demo import demo_model_path
    from updatable.network import TrainableNetwork
    from updatable.spec import read_update_spec

    torch.set_num_threads(1)
    model = mljax.MLModel(demo_model_path())
    params = {} if args.epochs is None else {"epochs": args.epochs}
    x, y, datasets, picks = _users(args.users, args.samples)
    loop = datasets[: args.loop_users or args.users]
    resolved = updatable.UpdateTask(model, datasets[0], parameters=params).parameters

    def population():
        return updatable.personalize(model, datasets, parameters=params)

    def task_loop():
        return [updatable.UpdateTask(model, d, parameters=params).run() for d in loop]

    # the torch loop: the head on precomputed embeddings, Core ML's update rule and order
    uspec = read_update_spec(model.get_spec())
    net = TrainableNetwork(model, uspec)
    emb = next(iter(net.network_inputs({"pixels": x}).values())).reshape(len(x), -1)
    head = {k.split("/")[-1]: np.asarray(v) for k, v in net.trainable_weights().items()}
    classes = {c: i for i, c in enumerate(uspec.class_labels)}
    targets = np.array([classes[v] for v in y])

    def torch_loop():
        batch, epochs = int(resolved["mini_batch_size"]), int(resolved["epochs"])
        for p_idx in picks[: len(loop)]:
            lin = torch.nn.Linear(emb.shape[1], len(classes))
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(head["weight"].reshape(len(classes), -1)))
                lin.bias.copy_(torch.from_numpy(head["bias"].reshape(-1)))
            opt = torch.optim.SGD(lin.parameters(), lr=resolved["learning_rate"], momentum=resolved["momentum"])
            xe, ye = torch.from_numpy(emb[p_idx]), torch.from_numpy(targets[p_idx])
            rng = np.random.default_rng(int(resolved["seed"]))
            for _ in range(epochs):
                order = torch.from_numpy(rng.permutation(len(p_idx)))
                for s in range(0, len(p_idx), batch):
                    idx = order[s:s + batch]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(lin(xe[idx]), ye[idx]).backward()
                    opt.step()

    rows = {"updatable.personalize": (_time(population, args.rounds), args.users),
            "loop of UpdateTask": (_time(task_loop, args.rounds), len(loop)),
            "PyTorch loop (head only)": (_time(torch_loop, args.rounds), len(loop))}
    print(f"\n{args.users} users x {args.samples} samples, {resolved['epochs']} epochs, mini-batches of "
          f"{resolved['mini_batch_size']}; {len(jax.devices())} {jax.devices()[0].platform} device(s), "
          f"median of {args.rounds} rounds after compilation\n")
    print("| runner | users/s | x UpdateTask loop |\n|---|---|---|")
    base = rows["loop of UpdateTask"][1] / rows["loop of UpdateTask"][0]
    out = {}
    for name, (seconds, n) in rows.items():
        out[name] = n / seconds
        print(f"| {name} | {out[name]:.1f} | {out[name] / base:.1f}x |")
    return out


if __name__ == "__main__":
    main()
