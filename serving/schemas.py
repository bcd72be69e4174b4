"""Request and response models of the HTTP API (pydantic v2; no BentoML import).

Request models forbid unknown fields, so a misspelt parameter (``topk``) is an error rather than
silently ignored. Every error response has the :class:`ErrorResponse` shape
(:func:`serving.http_errors.error_body`).
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ClassifyParams", "ClassNamesRequest", "ImageClassParams", "EmptyRequest",
    "ClassScore", "ClassInfo", "OpenSetDecision", "OpenSetInfo", "ClassifyResponse", "ClassifyBatchResponse",
    "ClassListResponse",
    "AddClassesResponse", "RemoveClassesResponse", "HealthResponse", "ErrorResponse",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmptyRequest(_Request):
    """Body of endpoints without parameters (``{}`` or empty)."""


class ClassifyParams(_Request):
    """Non-file form fields of ``/classify`` and ``/classify_batch``."""

    top_k: int | None = Field(
        default=None,
        description="Classes to return per image, 1..number of classes (default: min(5, number of classes)).",
    )
    classes: list[str] | None = Field(
        default=None,
        description="Ad-hoc class list for this request only: a JSON array in one form field, one comma-separated "
        "value (`red circle,blue square`), or the field repeated once per name; default: the registered classes.",
    )
    keep_rate: float | None = Field(
        default=None,
        description="Open-set answers: share of images of listed classes to keep, 0 < keep_rate <= 1 (1 never "
        "answers none_of_these); default: the server's PROMPTCLIP_KEEP_RATE, else the bundle's calibration.",
    )
    open_set_rule: str | None = Field(
        default=None,
        description="Open-set score: `max_cosine` (best class's cosine) or `msp` (best class's softmax probability); "
        "default: the server's PROMPTCLIP_OPEN_SET_RULE, else the bundle's calibration.",
    )


class ClassNamesRequest(_Request):
    """JSON body of ``/add_classes`` and ``/remove_classes``."""

    names: list[str] = Field(description="Class names (whitespace is trimmed and collapsed).")


class ImageClassParams(_Request):
    """Non-file form fields of ``/add_classes`` in its multipart form (a class built from example images)."""

    name: str = Field(description="The class name (normalised as in the JSON form).")
    text_weight: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Blend weight of the name's text embedding: 0 = images only (the default), 1 = name only.")
    modality_shift: bool | None = Field(
        default=None,
        description="Move the images' prototype into the text embeddings' cone with the bundle's calibration "
        "images (default: true; without calibration images in the bundle no shift is applied).")


class ClassScore(BaseModel):
    """One ranked class."""

    name: str
    score: float = Field(description="Softmax probability over the request's class list.")
    logit: float = Field(description="logit_scale * cosine(image, class text).")
    confidence: float | None = Field(
        default=None,
        description="Calibrated score in [0, 1]: the share of held-out images of listed classes whose best score "
        "(by the open-set rule) is <= this class's score (a conformal p-value); null without calibration.")


class OpenSetDecision(BaseModel):
    """How ``none_of_these`` was decided for this request."""

    rule: str = Field(description="`max_cosine` or `msp`.")
    keep_rate: float = Field(description="Share of held-out images of listed classes the threshold keeps.")
    threshold: float | None = Field(description="Best scores below it answer none_of_these (null: keep_rate 1, "
                                                "or no basis).")
    basis: str = Field(description="`classes`: held-out images of the listed classes; `bundle`: too few of those, "
                                   "all held-out images against the bundle's classes (max_cosine only); `none`: no "
                                   "threshold for this list (msp with too few held-out images of listed classes).")
    num_images: int = Field(description="Held-out images the threshold comes from.")


_VERSION_DOC = ("Version of the registered class list the image(s) were ranked against (null for an ad-hoc "
                "`classes` list); every worker and replica over one state directory agrees on it.")


class ClassifyResponse(BaseModel):
    """Top classes of one image, best first."""

    predictions: list[ClassScore]
    classes_version: int | None = Field(default=None, description=_VERSION_DOC)
    none_of_these: bool | None = Field(
        default=None, description="True when the image's best class scores below the open-set threshold: it belongs "
        "to none of the listed classes. Null when the bundle has no calibration.")
    open_set: OpenSetDecision | None = Field(default=None, description="The open-set decision; null without "
                                                                        "calibration.")


class ClassifyBatchResponse(BaseModel):
    """Top classes per image, in upload order."""

    results: list[list[ClassScore]]
    classes_version: int | None = Field(default=None, description=_VERSION_DOC)
    none_of_these: list[bool | None] = Field(
        default_factory=list, description="Per image, parallel to `results`: see ClassifyResponse.none_of_these.")
    open_set: OpenSetDecision | None = Field(default=None, description="The open-set decision; null without "
                                                                        "calibration.")


class ClassInfo(BaseModel):
    """One registered class and where its row comes from."""

    name: str
    source: str = Field(description="'text' (the name), 'images' (example images) or 'text+images' (blended).")
    num_images: int = Field(description="Example images the class was built from (0 for a text class).")


class ClassListResponse(BaseModel):
    """The active class list."""

    names: list[str]
    version: int
    num_classes: int
    classes: list[ClassInfo] = Field(default_factory=list, description="Each class with its provenance, in order.")


class AddClassesResponse(BaseModel):
    """Result of ``/add_classes``."""

    added: list[str]
    version: int
    num_classes: int
    source: str | None = Field(default=None, description="Where the added classes' rows come from, as `/classes` "
                               "shows it: 'text' (names, the JSON form), 'images' or 'text+images'.")
    num_images: int | None = Field(default=None, description="Example images of a class built from images (0 for "
                                   "names).")


class RemoveClassesResponse(BaseModel):
    """Result of ``/remove_classes``."""

    removed: list[str]
    version: int
    num_classes: int


class OpenSetInfo(BaseModel):
    """The bundle's calibration for open-set answers and the defaults in force."""

    calibrated: bool
    num_images: int = Field(description="Held-out calibration images in the bundle.")
    num_classes: int = Field(description="Classes they cover.")
    rule: str = Field(description="Default open-set rule.")
    keep_rate: float = Field(description="Default keep rate.")


class HealthResponse(BaseModel):
    """Readiness details."""

    status: str
    method: str
    backbone: str | None = None
    num_classes: int
    classes_version: int
    runtime: str
    providers: list[str]
    embedding_dim: int
    num_prompt_sets: int = Field(default=1, description="Prompt sets (text graphs) whose scores are combined.")
    prompt_sets: list[str] = Field(default_factory=lambda: ["default"], description="Names of the prompt sets.")
    worker_pid: int | None = Field(default=None, description="Process id of the worker that answered.")
    open_set: OpenSetInfo | None = Field(default=None, description="Calibration for open-set answers; null when "
                                                                    "the bundle has none (none_of_these is null).")


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer produced by promptclip."""

    error: str = Field(description="Error type, e.g. ClassNameError.")
    message: str = Field(description="What went wrong and how to fix it.")
    field: str | None = Field(default=None, description="Request field the error is about.")
