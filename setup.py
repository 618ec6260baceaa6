"""SafeVid: safety alignment of video LMMs (data generation, ZeRO-3 DPO, evaluation).

`kernels/`, `launcher/` and `data_prep/` live at the top of the repository but are installed
under the `safevid` namespace: `kernels` is already taken on PyPI (and transformers probes for
it), so top-level names would collide.
"""

from setuptools import setup

PACKAGES = {
    "safevid": "safevid",
    "safevid.models": "safevid/models",
    "safevid.data": "safevid/data",
    "safevid.eval": "safevid/eval",
    "safevid.kernels": "kernels",
    "safevid.launcher": "launcher",
    "safevid.data_prep": "data_prep",
}

setup(
    name="safevid",
    version="0.1.0",
    description="Open infrastructure for aligning video LMMs for safety (SafeVid)",
    python_requires=">=3.11",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={
        "safevid": ["assets/*", "assets/**/*"],
        "safevid.eval": ["*.md"],
        "safevid.data_prep": ["taxonomy/*.yaml", "prompts/*", "prompts/**/*"],
    },
    include_package_data=True,
    # Ranges are the ones the test suite runs against; torch is installed first by the
    # Makefile (TORCH_SPEC) so that pip never pulls a multi-GB CUDA build by accident.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16,<0.20",
        "transformers>=5.0,<5.30",
        "datasets>=3.0,<6",
        "webdataset>=0.2.100,<1.1",
        "sentencepiece>=0.2,<0.3",
        "openai>=1.50,<4",
        "decord>=0.6,<0.7",
        "av>=12,<19",
        "protobuf>=4",
        "pillow>=10",
        "omegaconf>=2.3,<2.5",
        "pyyaml>=6",
        "jsonschema>=4",
        "tqdm>=4.60",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "accelerate>=1.0",
        "tensorboard>=2.15,<3",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6", "triton>=3.0"],
        "dev": ["pytest>=8", "ruff>=0.6", "triton>=3.0"],
    },
    entry_points={"console_scripts": ["safevid=safevid.cli:main"]},
)
