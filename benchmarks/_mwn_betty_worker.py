"""Worker for benchmarks/mwn_speed.py: MWN reweighting iterations/s under Betty (torch CPU).

Same task as the jaxmlo side: digits long-tailed (IF 10), MLP 64-H-10 classifier (SGD,
momentum 0.9, weight decay 5e-4), 1-100-1 Meta-Weight-Net (Adam), 8 pre-drawn batches
cycled. The case and a plain Betty classifier alternate in timed blocks in this process (so
their ratio is robust to the machine's load). Prints one JSON line.
"""

import argparse
import json
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

from jaxmlo.examples import digits as dg


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--method", default="darts", help="Betty method: plain | darts | sama | cg | neumann"
    )
    ap.add_argument("--unroll", type=int, default=1, help="classifier steps per meta step")
    ap.add_argument("--hidden", type=int, default=256, help="hidden width of the classifier MLP")
    ap.add_argument("--batch", type=int, default=128, help="classifier batch size")
    ap.add_argument("--iters", type=int, default=50, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="timed blocks (alternating with plain)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    data = dg.long_tailed_digits(10, 0)

    def batches(split, seed):
        fn = dg.sampler(split, args.batch, seed)
        return [(torch.from_numpy(x), torch.from_numpy(y).long()) for x, y in map(fn, range(8))]

    def build(method):
        """A fresh Betty engine for ``method`` ("plain" or a Betty hypergradient type)."""
        torch.manual_seed(0)
        clf = torch.nn.Sequential(
            torch.nn.Linear(64, args.hidden), torch.nn.ReLU(), torch.nn.Linear(args.hidden, 10)
        )
        mwn = torch.nn.Sequential(
            torch.nn.Linear(1, 100), torch.nn.ReLU(), torch.nn.Linear(100, 1), torch.nn.Sigmoid()
        )
        plain = method == "plain"
        unroll = 1 if plain else args.unroll

        class Classifier(ImplicitProblem):
            def training_step(self, batch):
                x, y = batch
                loss = F.cross_entropy(self.module(x), y, reduction="none").reshape(-1, 1)
                if plain:
                    return loss.mean()
                return torch.mean(self.reweight(loss.detach()) * loss)

        class Reweight(ImplicitProblem):
            def training_step(self, batch):
                x, y = batch
                return F.cross_entropy(self.classifier(x), y)

        typ = "darts" if plain else method
        classifier = Classifier(
            name="classifier",
            module=clf,
            config=Config(type=typ, unroll_steps=unroll),
            optimizer=torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
            train_data_loader=batches(data["train"], 0),
        )
        problems, deps = [classifier], {"u2l": {}, "l2u": {}}
        if not plain:
            reweight = Reweight(
                name="reweight",
                module=mwn,
                config=Config(type=typ),
                optimizer=torch.optim.Adam(mwn.parameters(), lr=1e-3),
                train_data_loader=batches(data["meta"], 1),
            )
            problems.append(reweight)
            deps = {"u2l": {reweight: [classifier]}, "l2u": {classifier: [reweight]}}
        eng = Engine(
            config=EngineConfig(train_iters=10**9, valid_step=10**9),
            problems=problems,
            dependencies=deps,
        )
        eng.train()
        return eng

    engines = {"case": build(args.method), "plain": build("plain")}

    def block(k, n):  # n classifier updates (Betty runs the meta step every unroll_steps)
        eng = engines[k]
        t0 = time.perf_counter()
        for _ in range(n):
            eng.global_step += 1
            eng.train_step()
        return (time.perf_counter() - t0) / n

    block("case", 10), block("plain", 10)  # warm up (allocator, autograd)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = {"case": [], "plain": []}
    n = args.iters * args.unroll  # same classifier updates per block as the jaxmlo side
    for _ in range(args.repeats):
        for k in ("plain", "case"):
            times[k].append(block(k, n))
    ratios = [c / p for c, p in zip(times["case"], times["plain"])]
    print(
        json.dumps(
            {
                "framework": "betty",
                "betty_type": args.method,
                "unroll_steps": args.unroll,
                "classifier_updates_per_s": 1.0 / float(np.median(times["case"])),
                "plain_updates_per_s": 1.0 / float(np.median(times["plain"])),
                "time_per_update_vs_plain": float(np.median(ratios)),
                "time_per_update_vs_plain_blocks": ratios,
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "rss_growth_bytes_during_timing": (
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
                )
                * 1024,
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
