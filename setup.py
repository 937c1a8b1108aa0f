from setuptools import setup

setup(
    name="timellm-fast",
    version="0.1.0",
    description="Fused Triton kernels for Time-LLM's patch embedding and reprogramming layer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # kernels/ ships inside the library as timellm_fast.kernels: a top-level `kernels`
    # would collide with another project's distribution on PyPI.
    packages=["timellm_fast", "timellm_fast.kernels"],
    package_dir={"timellm_fast": "timellm_fast", "timellm_fast.kernels": "kernels"},
    install_requires=["torch>=2.6", "triton", "numpy"],
    extras_require={
        # README's install: the test suite, and the main job (timellm-fast: the benchmark suites,
        # their plots, progress bars of the forecast)
        "dev": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "transformers", "matplotlib"],
    },
    entry_points={"console_scripts": ["timellm-fast=timellm_fast.cli:main"]},
)
