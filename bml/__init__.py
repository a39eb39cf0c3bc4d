"""Binocular Mutual Learning (BML, ICCV 2021) for few-shot image classification."""

__version__ = "0.1.0"

__all__ = ["FewShotClassifier", "__version__"]


def __getattr__(name: str):
    # Imported lazily so that `import bml` stays light (no torch model code until needed).
    if name == "FewShotClassifier":
        from bml.classifier import FewShotClassifier

        return FewShotClassifier
    raise AttributeError(f"module 'bml' has no attribute {name!r}")
