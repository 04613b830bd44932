import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "elastic_fx" / "version.py").read_text()).group(1)

setup(
    name="elastic_fx",
    version=version,
    description="Turn any pretrained Vision Transformer into an elastic one: "
    "label-free structured pruning (SnapViT) as a torch.fx compiler pass, exported to ONNX per budget.",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["elastic_fx", "elastic_fx.*"]),
    install_requires=[
        "torch>=2.6",
        # Triton ships wheels for Linux x86-64/aarch64 only; elsewhere the kernels fall back to PyTorch.
        "triton>=3.1; platform_system == 'Linux' and platform_machine in 'x86_64 aarch64'",
        "timm>=1.0",
        "onnx>=1.16",
        "onnxscript>=0.1",
        "onnxruntime>=1.18",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=10",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
    ],
    extras_require={
        "gpu": ["onnxruntime-gpu>=1.18"],
        "plots": ["matplotlib>=3.7"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "transformers>=4.45",
            "torchvision>=0.20",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
            "pillow>=10",
            "torch-pruning>=1.4",
        ],
    },
    entry_points={"console_scripts": ["elastic-fx=elastic_fx.cli:main"]},
)
