"""The examples in the public modules' docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import jaxinf
import jaxmlo

SKIP = {"jaxmlo.__main__", "jaxinf.__main__"}  # print on import-as-main only; nothing to test


def _modules():
    names = []
    for pkg in (jaxmlo, jaxinf):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name not in SKIP:
                names.append(info.name)
    return names


MODULES = _modules()


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=vars(module).copy()):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_docstring_examples_are_doctests():
    # An example written as a literal block (``Example::``) would never run: use ``>>>``.
    attempted, literal = 0, []
    for name in MODULES:
        module = importlib.import_module(name)
        for test in doctest.DocTestFinder().find(module, name):
            attempted += len(test.examples)
            if test.docstring and "Example::" in test.docstring:
                literal.append(test.name)
    assert not literal, f"literal (never run) examples in: {literal}"
    assert attempted >= 10, "docstring examples disappeared"
