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

In Python (a loss takes its own parameters first, then what it depends on, then the batch):
  import jaxmlo; help(jaxmlo)          the top level, grouped, is in jaxmlo.__all__:
                                         in your loop: unroll(adjoint=...), hypergradient_transform,
                                           bilevel, checkpointed_scan
                                         adjoints: itd, cg, neumann, direct, finite_difference,
                                           sama, implicit (HypergradMethod, SolveInfo)
                                         programs: Problem, Program, init, step, make_step, run,
                                           problem_gradient, save/restore_checkpoint
  jaxmlo.functional                    the explicit hypergradient and meta_step, and the
                                       records they pass (BilevelState, HypergradInfo, ...)
  jaxmlo.parallel                      data_mesh, parallel_step, replicate, shard_batches,
                                       mixed_precision
  jaxmlo.testing                       test hooks (import it explicitly)
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
