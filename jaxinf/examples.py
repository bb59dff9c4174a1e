"""Small offline attribution tasks: digits (MLP, patch CNN) and a byte-level LM on pydoc text.

Used by the demo, the notebooks, ``benchmarks/lds.py`` and ``benchmarks/brittleness.py``; the
data ship with scikit-learn and Python, so nothing is downloaded. A :class:`Task` carries the
model, the splits and pure ``init_fn`` / ``train_fn`` / ``output_fn`` functions that
``jaxinf.retrain`` and ``jaxinf.lds`` take.

Example:
  >>> from jaxinf import examples
  >>> task = examples.digits_task("mlp", n_train=100, n_test=20, flip=5)
  >>> task.x_train.shape, len(task.info["flipped"])
  ((100, 64), 5)
"""

from jaxinf._src.examples import (
    CNN,
    MLP,
    ByteLM,
    Task,
    digits_task,
    lm_task,
    load_digits_split,
    pydoc_paragraphs,
)
from jaxinf._src.llama import *  # noqa: F403  (the Llama-style LM)
from jaxinf._src.llama import __all__ as _llama_all

__all__ = [
    "ByteLM",
    "CNN",
    "digits_task",
    "lm_task",
    "load_digits_split",
    "MLP",
    "pydoc_paragraphs",
    "Task",
    *_llama_all,
]
