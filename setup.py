"""The one thing pyproject.toml cannot declare (yet, except as an experiment): the optional C
extension `workers.corpus._native`. `optional=True`: without a C compiler the install goes on,
and the corpus builder uses the pure-Python scans of workers/corpus/textscan.py instead."""

from glob import glob

from setuptools import Extension, setup

NATIVE = "workers/corpus/native"

setup(
    ext_modules=[
        Extension("workers.corpus._native", sorted(glob(f"{NATIVE}/*.c")), depends=[f"{NATIVE}/native.h"],
                  optional=True, extra_compile_args=["-O2", "-fvisibility=hidden"]),
    ],
)
