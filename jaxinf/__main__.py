"""``python -m jaxinf``: what the package offers, and where to start."""

import jaxinf

TEXT = f"""\
jaxinf {jaxinf.__version__}: training-data attribution (influence functions) at scale in JAX

LoGra per-example gradients captured from Flax models, tensorstore gradient logs, streamed
influence queries, and counterfactual evaluation (LDS, brittleness) with baselines.

Run:
  python -m jaxinf.demo --out runs/demo    which training images made a digits MLP predict what
                                           it predicts; self-influence finds flipped labels
  (add --help for its options)

In Python:
  import jaxinf; help(jaxinf)              every public name is in jaxinf.__all__
  jaxinf.examples                          small offline tasks: digits MLP/CNN, a byte LM

Docs (in the repository):
  README.md                                install, supported versions, a first example
  docs/capture.md                          per-example LoGra gradients from Flax models
  docs/logs.md                             gradient logs and influence queries
  docs/format.md                           the on-disk format of a log
  docs/evaluation.md                       LDS, brittleness, baselines
  docs/scaling.md                          sharded logging and queries
Notebooks: notebooks/influence_digits.ipynb, notebooks/influence_lm.ipynb
"""


def main() -> None:
    print(TEXT, end="")


if __name__ == "__main__":
    main()
