"""Will a MusicLDM-layout model load? Answered from its configs and safetensors headers, without reading weights.

:func:`check` (``musiccm.model.check_loadable``) reads ``model_index.json`` and every component's config, builds
each weight-holding module from its config on the meta device (no memory, no initialisation) and compares its
parameter names and shapes with the tensors listed in the safetensors header(s), renaming legacy checkpoint keys
the way diffusers and transformers do when they load. A truncated or corrupt weights file, a missing or extra
tensor or one of another shape is a :class:`~musiccm.model.ModelError` naming the component and the first few
differences. Works on a local directory or an ``s3://`` prefix: for S3 it lists the prefix, reads the JSON files
and, per weights file, its size and header by ranged reads (a few kB each), never the tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from musiccm import storage, vocoders
from musiccm.model import CLASSES, REQUIRED, ModelError

WEIGHTED = ("unet", "vae", "text_encoder", "vocoder")  # components whose weights load() reads
WEIGHTS_FILE = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}
MAX_HEADER = 100 * 2**20  # bytes; safetensors itself refuses larger headers
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
SHOWN = 3  # differences named per kind


class _Tree:
    """Read access to the files of a local model directory or an s3:// model prefix, by relative path."""

    def __init__(self, root: str, name: str):
        self.root, self.name, self.s3 = root.rstrip("/"), name, storage.is_s3(root)
        try:
            files = storage.list_files(self.root) if self.s3 else [
                os.path.join(d, f) for d, _, names in os.walk(self.root) for f in names]
        except storage.StorageError as exc:
            raise ModelError(f"model {name!r}: cannot list its files ({exc})") from None
        self.files = {f[len(self.root) + 1:].replace(os.sep, "/") for f in files}

    def has(self, rel: str) -> bool:
        return rel in self.files

    def has_dir(self, rel: str) -> bool:
        return any(f.startswith(rel + "/") for f in self.files)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.s3 else os.path.join(self.root, rel)

    def json(self, rel: str) -> dict[str, Any]:
        """A JSON object file; ModelError when it is missing, unreadable or not a JSON object."""
        if not self.has(rel):
            raise ModelError(f"model {self.name!r}: {rel} is missing")
        try:
            data = storage.read_bytes(self.path(rel)) if self.s3 else Path(self.path(rel)).read_bytes()
            value = json.loads(data)
        except (OSError, storage.StorageError, ValueError) as exc:
            raise ModelError(f"model {self.name!r}: {rel} is not readable JSON ({_line(exc)})") from None
        if not isinstance(value, dict):
            raise ModelError(f"model {self.name!r}: {rel} is not a JSON object")
        return value

    def tensor_shapes(self, rel: str) -> dict[str, tuple[int, ...]]:
        """Tensor name → shape from a safetensors header; ModelError for a truncated or malformed file."""
        try:
            if self.s3:
                fs, path = storage.pyarrow_fs(self.path(rel))
                with fs.open_input_file(path) as f:
                    return _parse_header(rel, f.size(), lambda n, at: f.read_at(n, at))
            with open(self.path(rel), "rb") as f:
                def read_at(n: int, at: int) -> bytes:
                    f.seek(at)
                    return f.read(n)

                return _parse_header(rel, os.fstat(f.fileno()).st_size, read_at)
        except ValueError as exc:
            raise ModelError(f"model {self.name!r}: {exc}") from None
        except (OSError, storage.StorageError) as exc:
            raise ModelError(f"model {self.name!r}: cannot read {rel} ({_line(exc)})") from None


def _line(exc: BaseException) -> str:
    """An exception's message on one line (first line, or its type name)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _parse_header(rel: str, size: int, read_at: Any) -> dict[str, tuple[int, ...]]:
    """Parse and check a safetensors header: u64 length, JSON {name: {dtype, shape, data_offsets}}, and a data
    section whose size is exactly what the offsets describe (what safetensors itself requires)."""
    if size < 8:
        raise ValueError(f"{rel} is truncated or empty ({size} bytes)")
    n = int.from_bytes(read_at(8, 0), "little")
    if n > size - 8 or n > MAX_HEADER:
        raise ValueError(f"{rel} is truncated or not a safetensors file (a {n}-byte header in a {size}-byte file)")
    try:
        header = json.loads(read_at(n, 8))
        shapes, end = {}, 0
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            shape = tuple(int(d) for d in entry["shape"])
            start, stop = (int(o) for o in entry["data_offsets"])
            width = DTYPE_BYTES.get(entry["dtype"])
            if stop < start or (width is not None and stop - start != width * math.prod(shape)):
                raise ValueError(f"tensor {key}: offsets {start}..{stop} do not hold {entry['dtype']}{list(shape)}")
            shapes[key], end = shape, max(end, stop)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{rel} is not a safetensors file (bad header: {_line(exc)})") from None
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "corrupt"
        raise ValueError(f"{rel} is {state}: its header describes {8 + n + end} bytes, the file has {size}")
    return shapes


def _file_shapes(tree: _Tree, component: str, library: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of a component's weights: one safetensors file, or the shards its index names."""
    single = f"{component}/{WEIGHTS_FILE[library]}"
    if tree.has(single):
        return tree.tensor_shapes(single)
    if tree.has(single + ".index.json"):
        weight_map = tree.json(single + ".index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"model {tree.name!r}: {single}.index.json has no weight_map")
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in sorted(set(weight_map.values())):
            shapes.update(tree.tensor_shapes(f"{component}/{shard}"))
        return shapes
    raise ModelError(f"model {tree.name!r}: {component}/ has no {WEIGHTS_FILE[library]}; its weights must be "
                     "safetensors (pickle checkpoints are never loaded)")


def _empty_module(library: str, class_name: str, config: dict[str, Any]) -> Any:
    """The module a config describes, its parameters on the meta device (no memory, no initialisation)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
    with init_empty_weights():
        if library == "diffusers":
            return cls.from_config(config)
        return cls(cls.config_class.from_dict(config))


def _rename(module: Any, library: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys as the library renames them on load (diffusers' pre-0.14 attention names; transformers'
    legacy LayerNorm gamma/beta, weight-norm and per-model renamings)."""
    if library == "diffusers":
        renamed = dict(shapes)
        module._fix_state_dict_keys_on_load(renamed)  # only pops and assigns keys: works on shapes too
        return renamed
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # another transformers layout: compare the keys as they are
        return shapes
    transforms = get_model_conversion_mapping(module)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = module.state_dict()
    return {rename_source_key(k, renamings, converters, module.base_model_prefix, expected)[0]: v
            for k, v in shapes.items()}


def _ignored(key: str, patterns: Iterable[str] | None) -> bool:
    return any(re.search(p, key) for p in patterns or ())


def _compare(module: Any, found: dict[str, tuple[int, ...]]) -> str:
    """How a checkpoint's tensors differ from what ``module`` needs ("" when they do not)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    buffers = {k for k, _ in module.named_buffers()}  # non-persistent buffers in old checkpoints are dropped
    missing = [k for k in expected if k not in found
               and not _ignored(k, getattr(module, "_keys_to_ignore_on_load_missing", None))]
    unexpected = [k for k in found if k not in expected and k not in buffers
                  and not _ignored(k, getattr(module, "_keys_to_ignore_on_load_unexpected", None))]
    shapes = [f"{k} {list(found[k])} in the file, {list(v)} by the config" for k, v in expected.items()
              if k in found and found[k] != v]
    parts = []
    for label, items in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected)):
        if items:
            more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            parts.append(f"{label}: {', '.join(items[:SHOWN])}{more}")
    return "; ".join(parts)


def _check_weights(tree: _Tree, component: str, library: str, class_name: str) -> None:
    config = tree.json(f"{component}/config.json")
    try:
        module = _empty_module(library, class_name, config)
    except Exception as exc:  # a constructor fed a bad config can raise anything
        raise ModelError(f"model {tree.name!r}: {component}/config.json does not describe a {class_name} "
                         f"({type(exc).__name__}: {_line(exc)})") from None
    differences = _compare(module, _rename(module, library, _file_shapes(tree, component, library)))
    if differences:
        raise ModelError(f"model {tree.name!r}: the {component} weights do not fit its config.json ({differences})")


def _check_tokenizer(tree: _Tree) -> None:
    if not (tree.has("tokenizer/tokenizer.json") or
            (tree.has("tokenizer/vocab.json") and tree.has("tokenizer/merges.txt"))):
        raise ModelError(f"model {tree.name!r}: tokenizer/ has neither tokenizer.json nor vocab.json + merges.txt")
    if tree.has("tokenizer/tokenizer_config.json"):
        tree.json("tokenizer/tokenizer_config.json")


def check(root: str, name: str, components: Iterable[str] = REQUIRED) -> None:
    """ModelError unless every component in ``components`` (and the optional feature extractor, with the full
    set) would load: configs parse, the scheduler class exists, weights fit their configs."""
    import diffusers

    wanted = tuple(components)
    tree = _Tree(root, name)
    index = tree.json("model_index.json")
    missing = [c for c in wanted if not tree.has_dir(c)]
    if missing:
        raise ModelError(f"model {name!r} lacks component(s) {', '.join(missing)}; need {', '.join(REQUIRED)}")
    if "scheduler" in wanted:
        scheduler = tree.json("scheduler/scheduler_config.json").get("_class_name")
        if not hasattr(getattr(diffusers, str(scheduler), None), "from_config"):
            raise ModelError(f"model {name!r}: unknown scheduler class {scheduler!r}")
    if "tokenizer" in wanted:
        _check_tokenizer(tree)
    if set(REQUIRED) <= set(wanted) and tree.has_dir("feature_extractor"):
        _check_feature_extractor(tree)
    for component in (c for c in WEIGHTED if c in wanted):
        if component == "vocoder" and vocoders.vocoder_class(index.get("vocoder")) == vocoders.CLASS_NAME:
            try:
                vocoders.config_from_dict(tree.json("vocoder/config.json"))
            except (TypeError, ValueError) as exc:
                raise ModelError(f"model {name!r}: vocoder/config.json: {_line(exc)}") from None
            continue
        _check_weights(tree, component, *CLASSES[component])


def _check_feature_extractor(tree: _Tree) -> None:
    from transformers import ClapFeatureExtractor

    config = tree.json("feature_extractor/preprocessor_config.json")
    try:
        ClapFeatureExtractor.from_dict(config)
    except Exception as exc:  # the constructor computes mel filters from the settings
        raise ModelError(f"model {tree.name!r}: feature_extractor/preprocessor_config.json does not describe a "
                         f"ClapFeatureExtractor ({type(exc).__name__}: {_line(exc)})") from None
