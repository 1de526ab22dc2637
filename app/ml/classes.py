"""The Herlev classes, their clinical grouping, and the cell-level Bethesda hint."""

from typing import Final

# Clinical order: the three normal cell types, then dysplasia by increasing grade.
# The folder names (and the original spelling "superficiel") are those of the Herlev release.
CLASS_NAMES: Final[tuple[str, ...]] = (
    "normal_superficiel",
    "normal_intermediate",
    "normal_columnar",
    "light_dysplastic",
    "moderate_dysplastic",
    "severe_dysplastic",
    "carcinoma_in_situ",
)
NORMAL_CLASSES: Final[frozenset[str]] = frozenset(CLASS_NAMES[:3])
ABNORMAL_CLASSES: Final[frozenset[str]] = frozenset(CLASS_NAMES[3:])

CLASS_LABELS: Final[dict[str, str]] = {
    "normal_superficiel": "Superficial squamous (normal)",
    "normal_intermediate": "Intermediate squamous (normal)",
    "normal_columnar": "Columnar (normal)",
    "light_dysplastic": "Mild dysplasia",
    "moderate_dysplastic": "Moderate dysplasia",
    "severe_dysplastic": "Severe dysplasia",
    "carcinoma_in_situ": "Carcinoma in situ",
}

# Cell-level hint only: a Bethesda interpretation is made on a whole slide, by a person.
BETHESDA_HINT: Final[dict[str, str]] = {
    "normal_superficiel": "NILM",
    "normal_intermediate": "NILM",
    "normal_columnar": "NILM",
    "light_dysplastic": "LSIL",
    "moderate_dysplastic": "HSIL",
    "severe_dysplastic": "HSIL",
    "carcinoma_in_situ": "HSIL",
}


def is_abnormal(class_name: str) -> bool:
    """True for the four dysplasia/carcinoma classes."""
    if class_name not in CLASS_NAMES:
        raise ValueError(f"unknown class {class_name!r}")
    return class_name in ABNORMAL_CLASSES
