"""rndpo: preference fine-tuning (DPO / Region-Normalized DPO) of medical image segmenters from
noisy quality-control judges. Method: Kalisch et al., arXiv 2601.23222 (2026)."""

__version__ = "0.1.0"
