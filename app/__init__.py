"""PapCAD: computer-assisted diagnosis for single-cell Pap-smear images."""

__version__ = "0.1.0"
