"""factorlm: fast, compact LSTM layers and language models (Kuchaiev & Ginsburg 2017, arXiv 1703.10722)."""

__version__ = "0.1.0"
