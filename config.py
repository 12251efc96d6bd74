"""``from nlref import config``: the model configuration (frozen dataclasses, presets).

A re-export of ``nlref.reference.config`` (standard library only: importing it never
imports numba or cupy). See SPEC.md#hope and SPEC.md#public-api.
"""

from nlref.reference.config import (  # noqa: F401
    ACTIVATIONS,
    CMS_VARIANTS,
    DTYPES,
    FAMILIES,
    PRESETS,
    CMSLevel,
    ModelConfig,
    from_dict,
    preset,
    preset_names,
)

__all__ = [
    "ACTIVATIONS", "CMS_VARIANTS", "CMSLevel", "DTYPES", "FAMILIES", "ModelConfig", "PRESETS",
    "from_dict", "preset", "preset_names",
]
