import jaxinf
import jaxmlo


def test_public_names_are_exported():
    for pkg in (jaxmlo, jaxinf):
        assert pkg.__version__
        for name in pkg.__all__:
            assert hasattr(pkg, name), f"{pkg.__name__}.{name} is listed in __all__ but missing"
