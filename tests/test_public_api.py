"""The public API of the package: ``structlayers.__all__`` is pinned here.

Adding a name is an API change made on purpose: add it to PUBLIC below in the same commit.
Removing or renaming one breaks users, and this test says so.
"""

import importlib

import structlayers

PUBLIC = [
    "StructuredSumLayer",
    "available",
    "create",
    "from_dense",
    "from_kronecker",
    "get",
    "Dense",
    "Kronecker",
    "LowRank",
    "Nystrom",
    "TT",
    "Sketched",
    "Monarch",
    "CP",
    "Tucker",
    "PIVOT_STRATEGIES",
    "Linear",
    "Conv2d",
    "replace_linear",
    "convert_model",
    "ReplacementReport",
    "choose",
    "Choice",
    "optimal_relative_error",
    "optimal_relative_error_kronecker",
]

#: Public modules besides the package itself (imported by name, not listed in __all__).
MODULES = ["structlayers.registry", "structlayers.testing", "structlayers.cli", "structlayers.demo",
           "structlayers.benchmarking", "structlayers.allocator", "structlayers.linalg", "structlayers.linalg.tt",
           "structlayers.linalg.blocks", "structlayers.linalg.sketch", "structlayers.linalg.cur",
           "structlayers.linalg.contract", "structlayers.linalg.decompose"]


def test_all_is_the_pinned_list():
    assert structlayers.__all__ == PUBLIC


def test_every_public_name_is_importable():
    namespace = {}
    exec("from structlayers import *", namespace)  # noqa: S102 -- exactly what a user's star import does
    for name in PUBLIC:
        assert namespace[name] is getattr(structlayers, name), name
    assert callable(structlayers.available) and structlayers.available() == sorted(structlayers.available())


def test_public_modules_import_and_declare_all():
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:  # demo and benchmarking are scripts' helpers: no star-import list
            continue
        assert len(names) == len(set(names)), module_name
        missing = [n for n in names if not hasattr(module, n)]
        assert not missing, (module_name, missing)


def test_names_kept_at_their_old_places():
    """Moved names stay importable where code imported them from before."""
    import structlayers.base as base
    import structlayers.demo as demo
    import structlayers.registry as registry

    for name in ("available", "get", "create", "from_dense", "from_kronecker"):
        assert getattr(base, name) is getattr(registry, name)
    assert callable(demo.decaying_factor)
