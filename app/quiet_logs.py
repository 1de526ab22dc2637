"""Keep TensorFlow's start-up notices, which read like errors to a new user, off the terminal; errors still show.

`quiet_tensorflow()` runs when the `app` package is first imported, so before any entry point (the CLI, the
server, a worker) imports TensorFlow. It sets TF_CPP_MIN_LOG_LEVEL=2 (errors only) unless the user set a level,
and honours the level in the two places TensorFlow does not:

- absl's Python logger (Keras' warnings) gets the same verbosity;
- TensorFlow writes two notices while its library loads, before its level applies: absl's "All log messages
  before absl::InitializeLog()" and "oneDNN custom operations are on" (INFO). The first `import tensorflow`
  therefore runs with standard error passed through a filter process that drops exactly those lines and
  forwards every other line at once, so even an import that crashes the process shows its message.

TF_CPP_MIN_LOG_LEVEL=0 turns all of this off.
"""

import importlib.abc
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from types import ModuleType

LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = "2"  # 0 all, 1 no INFO, 2 no WARNING, 3 no ERROR
LOAD_NOTICES = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on")

# Run by a separate interpreter (-I -S: no site, no user paths), so it outlives a crash of this process.
_FILTER = """
import sys
notices = [n.encode() for n in sys.argv[1:]]
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not any(n in line for n in notices):
        out.write(line)
        out.flush()
"""


def quiet_tensorflow() -> None:
    """Set TensorFlow's log level (unless set) and filter its load-time notices when the level hides INFO."""
    level = os.environ.setdefault(LEVEL_VARIABLE, DEFAULT_LEVEL)
    if not level.isdigit() or int(level) < 1 or "tensorflow" in sys.modules:
        return
    if not any(isinstance(finder, _QuietFirstImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFirstImport(int(level)))


@contextmanager
def filtered_stderr(notices: Sequence[str] = LOAD_NOTICES) -> Iterator[None]:
    """Pass everything written to file descriptor 2 (C++ and Python alike) through a filter dropping `notices`."""
    _flush_stderr()
    try:
        saved = os.dup(2)
    except OSError:  # no standard error at all: nothing to filter
        yield
        return
    try:
        pipe = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER, *notices], stdin=subprocess.PIPE, stdout=saved
        )
    except OSError:  # no interpreter to run the filter: better noise than lost errors
        os.close(saved)
        yield
        return
    assert pipe.stdin is not None
    os.dup2(pipe.stdin.fileno(), 2)
    try:
        yield
    finally:
        _flush_stderr()
        os.dup2(saved, 2)
        os.close(saved)
        pipe.stdin.close()
        try:
            pipe.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a process started meanwhile holds the pipe; the filter goes on
            pass


def _flush_stderr() -> None:
    if sys.stderr is not None:  # None under pythonw and some daemons
        sys.stderr.flush()


def _set_absl_verbosity(level: int) -> None:
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR if level >= 2 else absl_logging.WARNING)


class _QuietFirstImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` with the other finders and hands its loader to `_FilteredLoader`, once."""

    def __init__(self, level: int) -> None:
        self.level = level

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec: ModuleSpec | None = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _FilteredLoader(spec.loader, self)
                return spec
        return None


class _FilteredLoader(importlib.abc.Loader):
    """Executes TensorFlow's `__init__` under `filtered_stderr`; the module keeps its own loader."""

    def __init__(self, loader: importlib.abc.Loader, finder: _QuietFirstImport) -> None:
        self.loader = loader
        self.finder = finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        _set_absl_verbosity(self.finder.level)
        with filtered_stderr():
            self.loader.exec_module(module)
