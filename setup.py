"""Build the optional C accelerator of the body reader; everything else is in pyproject.toml.

``optional=True``: where no C compiler or Python headers are installed, the
build goes on without it and popsync runs its pure-Python reader
(popsync/pop3/reader.py), which gives the same results.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "popsync.pop3._bodypass",
            sources=["popsync/pop3/_bodypass.c"],
            optional=True,
        )
    ]
)
