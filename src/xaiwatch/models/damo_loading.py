"""Load an official DAMO-YOLO model directory without executing its Python or unpickling anything.

A modelscope DAMO-YOLO directory holds ``configuration.json``, ``damoyolo.py`` (a Python config that modelscope
*imports*, i.e. runs), the weights (``.pth``/``.pt``), ``label_map.pkl`` (a pickle: loading it can run code) and
the TinyNAS structure ``.txt``. Here the config is parsed with :mod:`ast` and only literal values are read
(dictionaries, lists, numbers, strings, and names bound earlier to such values), the structure file is read as a
literal, the weights with ``torch.load(weights_only=True)``, and the class names come from ``names=`` or from a
literal ``class_names`` in ``damoyolo.py`` or ``configuration.json`` -- never from the pickle.
"""

from __future__ import annotations

import ast
import json
import operator
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xaiwatch.core.errors import ConfigurationError

__all__ = ["read_damo_directory", "load_damo_weights", "read_checkpoint", "read_literal_config"]

_PRIOR_BIAS = -4.59511985013459  # ZeroHead's class-bias initialisation, log(0.01 / 0.99)
_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class _NotLiteral:
    """Marks a config value that is not a literal (a call, an attribute, ...): an error only if it is needed."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __repr__(self) -> str:
        return f"<not a literal: {self.source}>"


def _sequence(node: ast.List | ast.Tuple | ast.Set, scope: dict[str, Any]) -> Any:
    items = [_literal(e, scope) for e in node.elts]
    bad = next((i for i in items if isinstance(i, _NotLiteral)), None)
    return bad or {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)


def _mapping(node: ast.Dict, scope: dict[str, Any]) -> Any:
    out: dict[Any, Any] = {}
    for k, v in zip(node.keys, node.values):
        value = _literal(v, scope)
        key = None if k is None else _literal(k, scope)
        if isinstance(value, _NotLiteral) or isinstance(key, _NotLiteral):
            return value if isinstance(value, _NotLiteral) else key
        if k is None:  # {**other}
            if not isinstance(value, dict):
                return _NotLiteral(ast.unparse(node))
            out.update(value)
        else:
            out[key] = value
    return out


def _arithmetic(node: ast.UnaryOp | ast.BinOp, scope: dict[str, Any]) -> Any:
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand, scope)
        if number(value):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:  # no ** : 9**9**9 would hang the reader
        left, right = _literal(node.left, scope), _literal(node.right, scope)
        if number(left) and number(right):
            try:
                return _BINOPS[type(node.op)](left, right)
            except ArithmeticError:
                pass
    return _NotLiteral(ast.unparse(node))


def _dict_call(node: ast.Call, scope: dict[str, Any]) -> Any:
    """``dict(a=1, b=2)``: the one call read, as a literal."""
    if not (isinstance(node.func, ast.Name) and node.func.id == "dict" and "dict" not in scope and not node.args):
        return _NotLiteral(ast.unparse(node))
    if any(k.arg is None for k in node.keywords):
        return _NotLiteral(ast.unparse(node))
    values = {k.arg: _literal(k.value, scope) for k in node.keywords}
    return next((v for v in values.values() if isinstance(v, _NotLiteral)), values)


def _literal(node: ast.AST, scope: dict[str, Any]) -> Any:
    """The value of an expression made of literals and names already bound to literals, else ``_NotLiteral``."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return _sequence(node, scope)
    if isinstance(node, ast.Dict):
        return _mapping(node, scope)
    if isinstance(node, ast.Name):
        return scope.get(node.id, _NotLiteral(node.id))
    if isinstance(node, (ast.UnaryOp, ast.BinOp)):
        return _arithmetic(node, scope)
    if isinstance(node, ast.Call):
        return _dict_call(node, scope)
    return _NotLiteral(ast.unparse(node))


def read_literal_config(path: str | os.PathLike) -> dict[str, Any]:
    """The module-level ``name = <literal>`` assignments of a Python config, read with :mod:`ast`, never run.

    Values that are not literals (calls, attributes, comprehensions) are kept as markers and reported only
    when a caller needs them.

    Raises:
        ConfigurationError: if the file is missing or is not valid Python.
    """
    path = Path(path)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except FileNotFoundError:
        raise ConfigurationError(f"Config file {str(path)!r} does not exist.") from None
    except SyntaxError as err:
        raise ConfigurationError(f"{str(path)!r} is not valid Python ({err.msg}, line {err.lineno}).") from None
    scope: dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign):
            value = _literal(stmt.value, scope)
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    scope[target.id] = value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            scope[stmt.target.id] = _literal(stmt.value, scope)
    return scope


def _need(value: Any, where: str, config: Path) -> Any:
    if isinstance(value, _NotLiteral):
        raise ConfigurationError(
            f"`{where}` in {config.name} is not a literal value ({value.source}); xaiwatch reads the config without "
            "executing it. Replace the expression by its value in the file."
        )
    return value


def _get(mapping: dict, key: str, where: str, config: Path, kind: type | tuple = dict) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise ConfigurationError(f"{config.name} has no `{where}`; an official DAMO-YOLO config defines it.")
    value = _need(mapping[key], where, config)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigurationError(f"`{where}` in {config.name} must be a {names}, got {type(value).__name__}.")
    return value


# ------------------------------------------------------------------------------------------------ weights
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a DAMO-YOLO checkpoint, read with ``torch.load(weights_only=True)``.

    Accepts a plain state dict or DAMO-YOLO's ``{"model": ..., "optimizer": ...}`` (also ``state_dict`` /
    ``ema``); strips the ``module.`` prefix of DDP checkpoints.

    Raises:
        ConfigurationError: if the file is missing, stores pickled objects, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"Weights file {str(path)!r} does not exist. Pass a local .pth/.pt file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for pickled objects
        raise ConfigurationError(
            f"{str(path)!r} is not a plain checkpoint of tensors: it stores pickled Python objects, and loading them "
            f"could run code from the file ({type(err).__name__}). Save `torch.load(path)['model']` (a state dict) "
            "with torch.save once, on a machine where you trust the file, and pass that."
        ) from None
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "ema"):
            if isinstance(ckpt.get(key), dict) and ckpt[key]:
                ckpt = ckpt[key]
                break
        state = {k.removeprefix("module."): v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
        if state:
            return state
    raise ConfigurationError(f"{str(path)!r} holds no tensors xaiwatch can read (got {type(ckpt).__name__}).")


def _deploy_repconvs(net: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Re-parameterise the RepConvs whose fused ``rbr_reparam`` the checkpoint holds (a deployed checkpoint)."""
    switched = []
    for name, m in net.named_modules():
        if hasattr(m, "rbr_dense") and f"{name}.rbr_reparam.weight" in state and hasattr(m, "switch_to_deploy"):
            m.switch_to_deploy()
            m.rbr_reparam.requires_grad_(True)
            switched.append(name)
    return switched


def _head_classes(
    net: nn.Module, state: dict[str, torch.Tensor], strict: bool, pad_background: bool
) -> tuple[list[str], bool]:
    """Check (and if asked, fix in ``state``) the class channels of ZeroHead's ``gfl_cls`` layers.

    Returns:
        the keys not to load (another class count, when not ``strict``) and whether a background channel was added.
    """
    head = net.head
    k, own = int(head.num_classes), int(head.cls_out_channels)
    skip, padded = [], False
    for i in range(len(head.gfl_cls)):
        wkey, bkey = f"head.gfl_cls.{i}.weight", f"head.gfl_cls.{i}.bias"
        if wkey not in state:
            continue
        got = int(state[wkey].shape[0])
        if got == own:
            continue
        if got == k and (pad_background or not strict):  # newer head without the background channel
            w = state[wkey]
            state[wkey] = torch.cat([w, w.new_zeros(1, *w.shape[1:])])
            if bkey in state:
                state[bkey] = torch.cat([state[bkey], state[bkey].new_full((1,), _PRIOR_BIAS)])
            padded = True
            continue
        if got == k:
            raise ConfigurationError(
                f"The checkpoint's class layer `{wkey}` has {got} output channels, the {k} classes without the extra "
                f"background channel (a newer DAMO-YOLO head, `legacy=False`), but modelscope's ZeroHead has "
                f"{own} = {k} + 1. Pass `pad_background=True` to add the channel (its score is dropped at inference, "
                "so detections are exactly the checkpoint's; `xaiwatch explain --pad-background`)."
            )
        if strict:
            ck = f"{got - 1} classes (+1 background channel) or {got} classes (newer head)"
            raise ConfigurationError(
                f"Class-count mismatch: the checkpoint's `{wkey}` has {got} output channels ({ck}), but the config "
                f"says num_classes={k}. Fix `num_classes` of the head in damoyolo.py (and the class names) to match "
                "the checkpoint; to fine-tune to other classes use DamoYoloModule(weights=...), which skips the "
                "class layer."
            )
        skip += [wkey, bkey]
    return skip, padded


def load_damo_weights(
    net: nn.Module, path: str | os.PathLike, strict: bool = True, pad_background: bool = False
) -> dict[str, list[str]]:
    """Load a DAMO-YOLO checkpoint into a network built by :func:`~xaiwatch.models.damo.build_damo_detector`.

    Args:
        net: the ``Detector``.
        path: ``.pth``/``.pt`` file (read with ``weights_only=True``).
        strict: every tensor must match by name and shape (an official directory); when ``False`` (fine-tuning)
            tensors that match are copied and the rest reported, e.g. the class layer of another class count.
        pad_background: accept a head without the background channel by adding it (see
            :func:`load_damo_directory`); always done when ``strict`` is ``False``.

    Returns:
        ``{"loaded": [...], "skipped": [...], "missing": [...], "padded": [...]}``: names copied, names in the file
        not copied, names of the model the file did not provide, and ``["head.gfl_cls"]`` when a background channel
        was added.

    Raises:
        ConfigurationError: for an unreadable file, a class-count or head mismatch, or (strict) any missing,
            unexpected or mis-shaped tensor, naming them.
    """
    state = read_checkpoint(path)
    _deploy_repconvs(net, state)
    skip, padded = _head_classes(net, state, strict, pad_background)
    own = net.state_dict()
    loaded = [k for k, v in state.items() if k not in skip and k in own and own[k].shape == v.shape]
    skipped = [k for k in state if k not in set(loaded)]
    missing = [k for k in own if k not in state]
    if strict and (skipped or missing):
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in skipped if k in own][:3]
        raise ConfigurationError(
            f"{os.fspath(path)!r} does not match the architecture of the config: "
            f"{len(missing)} tensors missing from the file (e.g. {missing[:3]}), {len(skipped)} in the file not in "
            f"the model or of another shape (e.g. {[k for k in skipped if k not in own][:3]} {shapes}). Is the "
            "structure file the one this checkpoint was trained with (e.g. tinynas_L20_k1kx.txt for -T, "
            "tinynas_L25_k1kx.txt for -S, tinynas_L35_kxkx.txt for -M), and the neck/head config its own?"
        )
    if not loaded:
        raise ConfigurationError(
            f"No tensor of {os.fspath(path)!r} matches the model (first names in the file: {list(state)[:3]}). "
            "Is it a DAMO-YOLO checkpoint of the same size?"
        )
    net.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "skipped": skipped, "missing": missing, "padded": ["head.gfl_cls"] if padded else []}


# ------------------------------------------------------------------------------------------------ directory
def _find_config(root: Path) -> Path:
    config = root / "damoyolo.py"
    if config.is_file():
        return config
    candidates = sorted(p for p in root.glob("*.py") if p.is_file())
    if len(candidates) == 1:
        return candidates[0]
    raise ConfigurationError(
        f"{str(root)!r} has no damoyolo.py (the config of a modelscope DAMO-YOLO directory)"
        + (f"; found several .py files: {[p.name for p in candidates]}" if candidates else "")
        + ". Pass the directory that holds the model's damoyolo.py, weights and structure file."
    )


def _read_structure(path: Path) -> list[dict[str, Any]]:
    text = "".join(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    try:
        structure = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ConfigurationError(
            f"Structure file {path.name} is not a literal list of blocks ({type(err).__name__}: {err})."
        ) from None
    if not isinstance(structure, list) or not all(isinstance(b, dict) and "class" in b for b in structure):
        raise ConfigurationError(
            f"Structure file {path.name} must be a list of block dictionaries with a 'class' key, as the TinyNAS "
            "files of the DAMO-YOLO repository (damo/base_models/backbones/nas_backbones/*.txt)."
        )
    return structure


def _json_name_candidates(cfg_json: Path) -> list[Any]:
    try:
        data = json.loads(cfg_json.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigurationError(f"{cfg_json} is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        return []
    candidates = []
    for section in (data, data.get("model"), data.get("dataset"), data.get("preprocessor")):
        if not isinstance(section, dict):
            continue
        candidates.append(section.get("class_names"))
        id2label = section.get("id2label")
        if isinstance(id2label, dict) and all(str(k).isdigit() for k in id2label):
            candidates.append([id2label[k] for k in sorted(id2label, key=int)])
    return candidates


def _names_from(scope: dict[str, Any], root: Path) -> list[str] | None:
    """Class names from a literal ``class_names`` in the config or in configuration.json, else ``None``."""
    dataset = scope.get("dataset")
    candidates = [scope.get("class_names"), dataset.get("class_names") if isinstance(dataset, dict) else None]
    if (root / "configuration.json").is_file():
        candidates += _json_name_candidates(root / "configuration.json")
    for names in candidates:
        if isinstance(names, (list, tuple)) and names and all(isinstance(n, str) for n in names):
            return list(names)
    return None


def _check_preprocessing(scope: dict[str, Any], config: Path) -> None:
    dataset = scope.get("dataset")
    if not isinstance(dataset, dict):
        return
    mean, std = dataset.get("input_pixel_mean"), dataset.get("input_pixel_std")
    bgr = dataset.get("input_to_bgr255", False)
    div = dataset.get("size_divisibility", 32)
    if (mean not in (None, [0.0, 0.0, 0.0], [0, 0, 0])) or (std not in (None, [1.0, 1.0, 1.0], [1, 1, 1])) or bgr:
        raise ConfigurationError(
            f"{config.name} asks for input normalisation (mean {mean}, std {std}, bgr255 {bgr}); xaiwatch's DAMO-YOLO "
            "adapter feeds RGB 0-255 without mean/std, as the official models expect. This model is not supported."
        )
    if div not in (None, 32):
        raise ConfigurationError(f"{config.name} sets size_divisibility={div}; xaiwatch pads to multiples of 32.")


def read_damo_directory(path: str | os.PathLike, names: list[str] | None = None) -> tuple[dict, list[str], Path]:
    """The architecture, class names and weights file of an official (modelscope) DAMO-YOLO model directory
    (:func:`xaiwatch.models.load_damo_directory` builds the module from them).

    Reads ``damoyolo.py`` with :mod:`ast` (literal values only, never executed), the TinyNAS structure file it
    names as a literal, the weights it names with ``torch.load(weights_only=True)`` (all tensors must match), and
    takes the class names from ``names`` or from a literal ``class_names`` in ``damoyolo.py`` / ``configuration.json``.
    ``label_map.pkl`` is never read: it is a pickle, and unpickling can run code.

    Args:
        path: the model directory.
        names: class names, one per class of the head; required unless the config carries them.

    Returns:
        ``(architecture, names, weights_path)``.

    Raises:
        ConfigurationError: for a missing directory, config, structure file or weights file; a config value that is
            not a literal; a checkpoint that does not match the architecture; a class-count mismatch; a head without
            background channel (unless ``pad_background``); missing or mis-counted class names. Each message says
            which file and what to do.
    """
    root = Path(path)
    if not root.is_dir():
        raise ConfigurationError(f"DAMO-YOLO model directory {str(root)!r} does not exist.")
    config = _find_config(root)
    scope = read_literal_config(config)
    model = _get(scope, "model", "model", config)
    backbone = dict(_get(model, "backbone", "model.backbone", config))
    neck = _get(model, "neck", "model.neck", config)
    head = dict(_get(model, "head", "model.head", config))
    _check_preprocessing(scope, config)
    if "structure" not in backbone:
        rel = _get(backbone, "structure_file", "model.backbone.structure_file", config, str)
        structure_path = root / rel
        if not structure_path.is_file():
            raise ConfigurationError(
                f"The backbone structure file {rel!r} named by {config.name} (model.backbone.structure_file) is "
                f"missing from {str(root)!r}. Copy it into the directory: the TinyNAS structures are in the DAMO-YOLO "
                f"repository under damo/base_models/backbones/nas_backbones/{Path(rel).name}."
            )
        backbone["structure"] = _read_structure(structure_path)
        backbone.pop("structure_file")
    num_classes = _get(head, "num_classes", "model.head.num_classes", config, int)
    if names is None:
        names = _names_from(scope, root)
        if names is None:
            raise ConfigurationError(
                f"No class names for {str(root)!r}: its label_map.pkl is a pickle, which xaiwatch does not unpickle "
                f"(loading a pickle can run code). Pass `names=[...]` ({num_classes} names, in the order of the "
                "model's classes; `xaiwatch explain --names a,b,...`), or add a literal `class_names` list to "
                "configuration.json or damoyolo.py."
            )
    if len(names) != num_classes:
        raise ConfigurationError(
            f"{len(names)} class names for a model with {num_classes} classes (model.head.num_classes in "
            f"{config.name}). Give one name per class."
        )
    weights_name = model.get("name")
    weights = root / weights_name if isinstance(weights_name, str) else None
    if weights is None or not weights.is_file():
        found = sorted(p.name for p in root.iterdir() if p.suffix in (".pth", ".pt"))
        if weights is None and len(found) == 1:
            weights = root / found[0]
        else:
            named = f"{weights_name!r} (model.name in {config.name})" if weights is not None else "no model.name"
            raise ConfigurationError(
                f"Weights file missing from {str(root)!r}: the config names {named}; .pth/.pt files present: "
                f"{found}. Put the checkpoint in the directory under that name."
            )
    return {"backbone": backbone, "neck": dict(neck), "head": head}, list(names), weights
