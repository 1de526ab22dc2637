"""Dynamic batching: simultaneous callers share forward passes, each gets its own result or error."""

import threading

import numpy as np
import pytest

from app.errors import InvalidImageError
from app.ml.batching import BatcherStopped, DynamicBatcher
from app.ml.classifier import Classifier


class GatedStub:
    """predict() records each batch; the first call waits until the test opens the gate, so the
    other callers are all queued by then."""

    def __init__(self):
        self.calls: list[list] = []
        self.entered = threading.Event()
        self.gate = threading.Event()

    def predict(self, images):
        self.calls.append(list(images))
        self.entered.set()
        self.gate.wait(30)
        if "bad" in images:
            raise InvalidImageError("bad image")
        return [f"result-{image}" for image in images]


def test_simultaneous_callers_share_forward_passes_and_get_their_own_results():
    stub = GatedStub()
    batcher = DynamicBatcher(stub, max_batch_size=8, batch_timeout_s=0.0)
    try:
        first = batcher.submit(0)
        assert stub.entered.wait(30)
        later = [batcher.submit(i) for i in range(1, 11)]
        stub.gate.set()
        results = [first.result(30)] + [f.result(30) for f in later]
    finally:
        batcher.stop()
    assert results == [f"result-{i}" for i in range(11)]
    assert [len(c) for c in stub.calls] == [1, 8, 2]  # 11 callers, 3 forward passes, none over 8
    assert batcher.batches_run == 3
    assert batcher.seconds_per_image is not None and batcher.seconds_per_image >= 0


def test_an_error_reaches_only_its_own_caller():
    stub = GatedStub()
    batcher = DynamicBatcher(stub, max_batch_size=8, batch_timeout_s=0.0)
    try:
        first = batcher.submit("a")
        assert stub.entered.wait(30)
        futures = {name: batcher.submit(name) for name in ("b", "bad", "c")}
        stub.gate.set()
        assert first.result(30) == "result-a"
        assert futures["b"].result(30) == "result-b" and futures["c"].result(30) == "result-c"
        with pytest.raises(InvalidImageError, match="bad image"):
            futures["bad"].result(30)
    finally:
        batcher.stop()


def test_stop_finishes_queued_work_then_refuses_more():
    stub = GatedStub()
    stub.gate.set()
    batcher = DynamicBatcher(stub, max_batch_size=4, batch_timeout_s=0.05)
    pending = [batcher.submit(i) for i in range(6)]
    batcher.stop()
    assert [f.result(30) for f in pending] == [f"result-{i}" for i in range(6)]
    with pytest.raises(BatcherStopped):
        batcher.submit(99)


class GatedClassifier:
    """The real classifier, whose first forward pass waits until every caller has queued."""

    def __init__(self, classifier: Classifier):
        self.classifier = classifier
        self.entered, self.gate = threading.Event(), threading.Event()
        self.batch_sizes: list[int] = []

    def predict(self, images):
        self.batch_sizes.append(len(images))
        self.entered.set()
        self.gate.wait(30)
        return self.classifier.predict(images)


def test_real_model_batched_results_equal_one_by_one(tiny_model_dir, herlev_one_per_class):
    classifier = Classifier.load(tiny_model_dir)
    images = [path.read_bytes() for path in herlev_one_per_class.values()]
    alone = [classifier.predict([data])[0] for data in images]
    gated = GatedClassifier(classifier)
    batcher = DynamicBatcher(gated, max_batch_size=32, batch_timeout_s=0.0)
    try:
        first = batcher.submit(images[0])
        assert gated.entered.wait(30)
        rest = [batcher.submit(data) for data in images[1:]]
        gated.gate.set()
        results = [first.result(120)] + [f.result(120) for f in rest]
    finally:
        batcher.stop()
    assert gated.batch_sizes == [1, len(images) - 1]
    for got, expected in zip(results, alone, strict=True):
        assert type(got) is type(expected) and got.predicted_class == expected.predicted_class
        assert np.allclose(list(got.probabilities.values()), list(expected.probabilities.values()), atol=1e-4)
