"""Pipeline families (`family.py`) and recording a pipeline's own call into its denoiser (`recording.py`)."""

from .family import DEFAULT, FAMILIES, TEXT_PIPELINES, Family, family_of, is_text_pipeline
from .recording import DenoiserCall, record_denoiser_call, recording_copy

__all__ = [
    "DEFAULT",
    "FAMILIES",
    "TEXT_PIPELINES",
    "DenoiserCall",
    "Family",
    "family_of",
    "is_text_pipeline",
    "record_denoiser_call",
    "recording_copy",
]
