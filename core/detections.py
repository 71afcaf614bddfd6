"""What a detection row's ``objects`` holds: written by ML, returned by ``GET /detection_result``."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class Box(BaseModel):
    """Corners of a bounding box in pixels of the frame (x right, y down)."""

    x1: float
    y1: float
    x2: float
    y2: float


class DetectedObject(BaseModel):
    """One object found in a frame; serialised with the key ``class`` for its class name."""

    model_config = ConfigDict(serialize_by_alias=True)

    class_name: str = Field(serialization_alias="class", validation_alias=AliasChoices("class", "class_name"))
    class_id: int
    confidence: float = Field(ge=0, le=1)
    box: Box
    track_id: int | None = Field(
        default=None, description="Its track (with tracking on): the same object keeps it"
    )
