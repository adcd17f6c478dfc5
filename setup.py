"""The one compiled module, engine/_kernels.c (the beam search's selection and the cache's row copies per decoder
step). Everything else about the package is in pyproject.toml. ``optional``: where no C compiler is found, the
install goes on and the engine runs the same loops in numpy (engine/search.py, engine/state_ops.py)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("engine._kernels", ["engine/_kernels.c"], optional=True)])
