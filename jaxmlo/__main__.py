"""``python -m jaxmlo``: what the package offers, and where to start."""

import jaxmlo

TEXT = f"""\
jaxmlo {jaxmlo.__version__}: multi-level gradient-based optimization in JAX

Hypergradient methods (itd, cg, neumann, finite_difference, sama) usable in any JAX training
loop, and a DAG engine that compiles a whole multi-level program into one step.

Run:
  python -m jaxmlo.quickstart          SAMA learns per-example weights that undo label noise
  python -m jaxmlo.examples.digits     the thesis's multi-level applications on digits
                                       (reweighting, label correction, three levels)
  (add --help to either for its options)

In Python:
  import jaxmlo; help(jaxmlo)          every public name is in jaxmlo.__all__
  jaxmlo.examples.digits               example problems and programs on digits

Docs (in the repository):
  README.md                            install, supported versions, a first example
  docs/hypergradients.md               the methods, in your own training loop
  docs/programs.md                     problems, programs, run(), checkpoints
  docs/scaling.md                      data parallelism and mixed precision
  docs/benchmarks.md                   speed and memory, with the commands
Notebooks: notebooks/hypergradients.ipynb, notebooks/data_reweighting.ipynb
"""


def main() -> None:
    print(TEXT, end="")


if __name__ == "__main__":
    main()
