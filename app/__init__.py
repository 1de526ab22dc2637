"""PapCAD: computer-assisted diagnosis for single-cell Pap-smear images."""

from app.quiet_logs import quiet_tensorflow

# Every entry point (CLI, server, worker) imports this package before anything imports TensorFlow.
quiet_tensorflow()

__version__ = "0.1.0"
