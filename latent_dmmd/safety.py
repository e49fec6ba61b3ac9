"""Checks that run before a pipeline folder is loaded: no pickles by default, intact
safetensors (header, checksums written at save time) and shapes that match the config.

A folder that fails a check raises ``ValueError`` naming the file (and the keys) before any
component is built, so no half-initialised pipeline is ever returned.
"""

from __future__ import annotations

import hashlib
import json
import os

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CHECKSUMS = "checksums.json"
CHECKSUMS_KEY = "_checksums"  # in model_index.json: this folder was saved with checksums
MAX_CHECKSUMS_BYTES = 1 << 20


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(folder: str) -> list[str]:
    """Relative paths of every safetensors and pickle file in a pipeline folder."""
    found = []
    for root, _, files in os.walk(folder, followlinks=True):  # a symlinked component is checked like any other
        for name in files:
            if name.endswith(".safetensors") or name.endswith(PICKLE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(found)


def drop_local_paths(folder: str) -> None:
    """Remove ``_name_or_path`` (the folder a component was loaded from, on the saving machine) from
    ``model_index.json`` and the component configs of a saved pipeline folder: it would travel with a
    shared model and name a path nobody else has."""
    paths = [os.path.join(folder, "model_index.json")]
    paths += [os.path.join(folder, name, config) for name in sorted(os.listdir(folder))
              for config in ("config.json", "scheduler_config.json")]  # fmt: skip
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                data = json.load(f)
            if data.pop("_name_or_path", None) is not None:
                with open(path, "w") as f:
                    json.dump(data, f, indent=2, sort_keys=True)
                    f.write("\n")


def write_checksums(folder: str) -> str:
    """Record the SHA-256 of every safetensors file (what ``save_pretrained`` wrote), and note in
    ``model_index.json`` that the folder has them, so a deleted ``checksums.json`` is noticed."""
    sums = {rel: _sha256(os.path.join(folder, rel)) for rel in weight_files(folder) if rel.endswith(".safetensors")}
    path = os.path.join(folder, CHECKSUMS)
    with open(path, "w") as f:
        json.dump(sums, f, indent=2, sort_keys=True)
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            spec = json.load(f)
        if spec.get(CHECKSUMS_KEY) != CHECKSUMS:
            spec[CHECKSUMS_KEY] = CHECKSUMS
            with open(index, "w") as f:
                json.dump(spec, f, indent=2, sort_keys=True)
                f.write("\n")
    return path


def read_checksums(folder: str, safetensors: list[str]) -> dict[str, str]:
    """The recorded checksums, or {} for a folder that never had any (saved by another tool).

    A ``checksums.json`` that ``model_index.json`` says was written but is missing, that is not a
    regular file (a link to ``/dev/zero``, a folder), that does not parse, or that leaves out a
    safetensors file of the folder is an error: a check that cannot run must not pass.
    """
    path = os.path.join(folder, CHECKSUMS)
    with open(os.path.join(folder, "model_index.json")) as f:
        promised = json.load(f).get(CHECKSUMS_KEY) is not None
    if not os.path.lexists(path):
        if promised:
            raise ValueError(f"{path} is missing, but the folder was saved with checksums: its weights cannot be verified")
        return {}
    if not os.path.isfile(path) or os.path.getsize(path) > MAX_CHECKSUMS_BYTES:
        raise ValueError(f"{path} is not a regular checksums file (a link to a device, a folder, or too large)")
    try:
        with open(path) as f:
            sums = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is unreadable: {err}") from err
    if not isinstance(sums, dict) or not all(isinstance(v, str) and len(v) == 64 for v in sums.values()):
        raise ValueError(f"{path} is not a map of file names to SHA-256 digests")
    unlisted = [rel for rel in safetensors if rel.replace(os.sep, "/") not in sums and rel not in sums]
    if unlisted:
        raise ValueError(f"{os.path.join(folder, unlisted[0])} is not listed in {CHECKSUMS}: the folder was changed after it was saved")
    return sums


def components(folder: str) -> list[str]:
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{folder} is not a pipeline folder: model_index.json is missing")
    with open(index) as f:
        spec = json.load(f)
    return [k for k, v in spec.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]


def check_pipeline_folder(folder: str, allow_pickle: bool = False) -> None:
    """Refuse pickle-only weights, damaged safetensors and shape mismatches (see module doc)."""
    from safetensors import safe_open

    files = weight_files(folder)
    for name in components(folder):
        mine = [f for f in files if f.split(os.sep)[0] == name]
        pickles = [f for f in mine if f.endswith(PICKLE_SUFFIXES)]
        if pickles and not any(f.endswith(".safetensors") for f in mine) and not allow_pickle:
            raise ValueError(
                f"{os.path.join(folder, pickles[0])} is a pickle: loading it could run arbitrary code. "
                "latent_dmmd loads safetensors only; pass allow_pickle=True to from_pretrained only for "
                "files you trust"
            )
    check_scheduler_config(folder)
    safetensors = [f for f in files if f.endswith(".safetensors")]
    sums = read_checksums(folder, safetensors)
    for rel in safetensors:
        path = os.path.join(folder, rel)
        try:
            with safe_open(path, "pt") as st:
                shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted): {err}") from err
        rel = rel.replace(os.sep, "/") if rel.replace(os.sep, "/") in sums else rel
        if rel in sums and _sha256(path) != sums[rel]:
            raise ValueError(f"{path} does not match its checksum in {CHECKSUMS}: the file is corrupted")
        _check_shapes(folder, rel, path, shapes)


def _check_shapes(folder: str, rel: str, path: str, shapes: dict) -> None:
    """Compare tensor shapes of a component's weights with a model built (empty) from its config."""
    component = rel.split(os.sep)[0]
    config_path = os.path.join(folder, component, "config.json")
    if not os.path.isfile(config_path):
        return
    with open(config_path) as f:
        config = json.load(f)
    model_cls = _model_class(config.get("_class_name"))
    if model_cls is None:
        return
    from accelerate import init_empty_weights

    _check_config_sizes(config_path, config)
    with init_empty_weights(include_buffers=True):  # nothing allocated, whatever sizes the config names
        model = model_cls.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = sorted(k for k in shapes if k in expected and shapes[k] != expected[k])
    missing = sorted(k for k in expected if k not in shapes and "reference_" not in k)
    if bad or missing:
        detail = "; ".join([f"{k}: file {shapes[k]}, config {expected[k]}" for k in bad[:5]] + [f"missing {k}" for k in missing[:5]])
        raise ValueError(f"{path} does not fit {component}/config.json ({len(bad)} shape mismatches, "
                         f"{len(missing)} missing keys): {detail}")  # fmt: skip


# sizes a config may name before anything is built from it (a folder is untrusted input)
CONFIG_LIMITS = {"sample_size": 4096, "in_channels": 4096, "out_channels": 4096, "num_reference_levels": 100_000,
                 "projection_dim": 1 << 24, "num_train_timesteps": 100_000, "num_inference_steps": 100_000,
                 "flow_steps_per_level": 100_000, "latent_channels": 4096}  # fmt: skip


def _check_config_sizes(path: str, config: dict) -> None:
    for key, limit in CONFIG_LIMITS.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit):
            raise ValueError(f"{path}: {key} = {value!r} is not a size this library builds (0 to {limit})")


def check_scheduler_config(folder: str) -> None:
    """Bound the scheduler config's sizes before diffusers builds arrays from them."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            _check_config_sizes(path, json.load(f))


def _model_class(name: str | None):
    if name is None:
        return None
    from .autoencoders import TAEF2
    from .models import DMMDDiscriminator, DMMDGenerator

    ours = {"DMMDDiscriminator": DMMDDiscriminator, "DMMDGenerator": DMMDGenerator, "TAEF2": TAEF2}
    if name in ours:
        return ours[name]
    import diffusers

    cls = getattr(diffusers, name, None)
    return cls if cls is not None and hasattr(cls, "from_config") and hasattr(cls, "state_dict") else None
