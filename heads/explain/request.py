"""What `iqa explain` asks for, checked whole before any model loads, then run: maps of model folders
(side by side), a bare backbone's feature bands, or the maps measured on a grid set (`evaluate`).
"""

from dataclasses import dataclass
from pathlib import Path

from iqa.errors import IqaError, SettingError
from iqa.heads.explain.attribution import METHODS, TARGETS
from iqa.heads.explain.evaluate import FILLS


@dataclass(frozen=True)
class ExplainRequest:
    inputs: tuple[Path, ...]  # a model folder, then image files and folders; with `backbone`, images only
    method: str = "gradcam"
    target: str = "high"
    compare: tuple[Path, ...] = ()  # more model folders, side by side
    bands: str | None = None  # feature bands "0-1,1-10" (percent from the top of |embedding|)
    backbone: str | None = None  # a bare backbone instead of a model folder
    model: str | None = None  # the backbone's weights: HF id or folder
    weights: str = "pretrained"  # the backbone's: extract/registry.py's WEIGHTS
    evaluate: bool = False  # measure the model's maps on a grid set instead of explaining images
    deletion_fill: str = "zero"  # what a deleted pixel becomes in the deletion curve (evaluate.FILLS)

    def __post_init__(self):
        if self.method not in METHODS or self.target not in TARGETS:
            raise SettingError(f"`method` must be one of {', '.join(METHODS)} and `target` one of {', '.join(TARGETS)}")
        if self.backbone is None and (self.model or self.weights != "pretrained"):
            raise SettingError("`model` and `weights` choose the weights of `backbone`; a model folder brings its own")
        if self.backbone is not None and (self.compare or not self.bands or self.evaluate):
            raise SettingError("`backbone` explains feature bands: give `bands` (e.g. 0-1,1-10,10-20), no `compare`, no `evaluate`")
        if self.evaluate and len(self.inputs) != 1:
            raise SettingError("`evaluate` takes one model folder and no images (the grid set is the images)")
        if self.deletion_fill not in FILLS:
            raise SettingError(f"`deletion_fill` must be one of {', '.join(FILLS)}, got {self.deletion_fill!r}")


def explain_images(request: ExplainRequest, out: Path, device: str = "cpu") -> list:
    """One page and one .npy per image into `out` (maps.explain_files); unreadable images carry their reason."""
    from iqa.heads.explain.attribution import parse_bands
    from iqa.heads.explain.maps import backbone_subject, explain_files, model_subject
    from iqa.heads.saved.model import image_files

    bands = parse_bands(request.bands) if request.bands else None
    if request.backbone is not None:
        subject = backbone_subject(request.backbone, request.model, request.weights, device)
        subjects, images = [subject], request.inputs
    else:
        folders = [request.inputs[0], *request.compare]
        subjects, images = [model_subject(folder, device) for folder in folders], request.inputs[1:]
    paths = image_files(list(images))
    if not paths:
        raise IqaError("no images given: name image files or folders after the model")
    return explain_files(subjects, paths, out, request.method, request.target, bands)


def evaluate_maps(request: ExplainRequest, cache: Path, grid_set: Path | None = None, device: str = "cpu",
                  out: Path | None = None):
    """The pointing game and deletion AUC of the model's maps on `grid_set` (default `<cache>/gridpg`, built once);
    with `out`, the deletion curves drawn there (deletion.png|pdf)."""
    from iqa.data.gridpg import grid_set_or_default
    from iqa.heads.explain.evaluate import evaluate
    from iqa.heads.explain.maps import model_subject, prepare_out
    from iqa.heads.report.figures import deletion_figure, save

    subject = model_subject(request.inputs[0], device)
    result = evaluate(subject, grid_set_or_default(cache, grid_set), request.method, request.deletion_fill)
    if out is not None:
        save(deletion_figure({subject.name: result.as_dict()}), prepare_out(out), "deletion")
    return result
