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
        # tests/test_integrations.py and tests/test_distributed.py's DeepSpeed rows: the Time-LLM ports
        # people install, and DeepSpeed (Time-LLM's run_main.py trains with ZeRO-2). Versions that
        # install with torch 2.13 on Python 3.11 and pass those tests. PyPOTS 1.5 pins
        # transformers <= 4.57.6, so this extra goes into a venv of its own (README, .ci/run).
        "integrations": ["neuralforecast==3.3.0", "pypots==1.5", "deepspeed==0.19.8"],
    },
    entry_points={"console_scripts": ["timellm-fast=timellm_fast.cli:main"]},
)
