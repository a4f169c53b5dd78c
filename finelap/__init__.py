"""FineLAP: fine-grained language-audio pretraining."""

__version__ = "0.1.0"
