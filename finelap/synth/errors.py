"""The error of the synthesis pipeline (bad input lines raise finelap.data.metadata.MetadataError)."""


class SynthError(ValueError):
    """The synthesis cannot go on: bad settings, no usable source, an output folder made with other settings."""
