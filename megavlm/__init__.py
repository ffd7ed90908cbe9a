"""megavlm: a Megatron-style 3D-parallel VLM training framework on megatron-core."""

from megavlm.platform import known_warnings as _known_warnings

_known_warnings.install()  # before anything imports megatron-core
