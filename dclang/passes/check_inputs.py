"""A library's or a plugin's model must be able to take the data's images.

dclang builds its own models for every dataset it knows, but a library's model was designed
for other images: torchvision's SqueezeNet pools an 8x8 digit down to nothing, a ViT's patch
size must divide the image. So each such node's model is built on torch's meta device for
the dataset's classes and image shape and run once (`dclang.models.taps.probe`, the same
cached forward that infers the shapes of layer edges): no data, no memory, no training.
Only a file that names such a model pays for it (it has imported torch already to check
the name); datasets whose image shape is known only once loaded (`npz`, `imagefolder`)
are checked when `dclang run` loads them.
"""

from __future__ import annotations

from dclang import registry
from dclang.diagnostics import Diagnostic, error
from dclang.syntax import ast

#: torch's words for a pooling or convolution window larger than what is left of the image
_TOO_SMALL = ("output size is too small", "kernel size can't be greater than actual input size",
              "indivisible by patch size")


def check_inputs(module: ast.Module, graph) -> list[Diagnostic]:
    from dclang.passes.check_models import check_model

    data = graph.graph.get("data")
    info = registry.dataset_info(data.dataset) if data is not None and isinstance(data.dataset, str) else None
    if info is None or not (info.channels and info.image_size):
        return []
    shape = (info.channels, info.image_size, info.image_size)
    out: list[Diagnostic] = []
    for decl in module.of(ast.NodeDecl):
        spec = graph.nodes[decl.name.text].get("spec") if decl.name.text in graph else None
        if spec is None or spec.is_ensemble or not isinstance(spec.model, str):
            continue  # an ensemble has no forward of its own; an open model is checked per trial
        if registry.is_model(registry.model_ref(spec.model)[0]) or check_model(decl):
            continue  # a built-in model takes every dataset's images; a bad name is check_models' to report
        from dclang.models.taps import probe

        found = probe(spec.model, info.num_classes or 10, shape)
        if found.problem:
            out.append(_cannot_take(decl, spec.model, data.dataset, shape, found.problem, found.built))
    return out


def _cannot_take(decl: ast.NodeDecl, model: str, dataset: str, shape: tuple[int, int, int], problem: str,
                 built: bool) -> Diagnostic:
    from dclang.diagnostics import clip

    size = f"{shape[1]}x{shape[2]}"
    label = "this model does not fit the data"
    if "patch size" in problem:
        why, label = f"its patch size does not divide {size} images", "patch size does not divide the images"
    elif any(words in problem.lower() for words in _TOO_SMALL):
        why = "its strides and pooling shrink them to nothing before its last layer"
        label = "images too small for this model"
    else:
        why = f"{'its forward' if built else 'building it'} fails on them ({clip(problem, 160)})"
    return error("E222", f"`{decl.name.text}` ({model}) cannot take the {shape[0]}x{size} images of `{dataset}`: "
                 f"{why}", decl.model.span, label,
                 help="pick a model made for small images (`dclang models` lists them; the built-in `cnn_small` "
                      "and `resnet20` take any dataset's images), or train on data with bigger images")
