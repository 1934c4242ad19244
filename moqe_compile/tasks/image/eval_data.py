"""Evaluation inputs: the bundle's own ``report/eval_data.npz`` (router_val and test splits,
written by the build) or user data (a folder of images, a ``.npz``).

``report/eval_data.npz`` (plain arrays, read with ``allow_pickle=False``) holds, per stored
split ``S``:

- ``S_pixels``: uint8 ``(N, C, H, W)``, the preprocessed images *before* scaling and
  normalization, with ``mean`` and ``std`` (float32, one per channel). The float32 input is
  ``(pixels / 255 - mean) / std`` in float32, which is bit-identical to what the build fed the
  models (Preprocess scales uint8 pixels the same way). The writer checks this bit for bit and
  otherwise stores
- ``S_x``: float32 ``(N, C, H, W)`` model inputs as they were.
- ``S_y``: int64 ``(N,)`` labels, when the split has labels.
- ``S_groups``: int64 ``(N,)`` source-image id per sample (augmented views of one photo share
  it), when known: the bootstrap then resamples sources, not views.

plus ``splits``: the stored split names. Storing pixels keeps the demo bundle's two
75-sample splits at 22 MB instead of 90 MB, losslessly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moqe_compile.errors import BundleError, InputError
from moqe_compile.evaluate.stats import group_index

EVAL_SPLITS = ("router_val", "test")


def _normalize(pixels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    # The same float32 operations, in the same order, as data.images.Preprocess.__call__.
    x = pixels.astype(np.float32) / 255.0
    return np.ascontiguousarray((x - mean[None, :, None, None]) / std[None, :, None, None])


def _to_pixels(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray | None:
    """uint8 pixels that normalize back to exactly ``x``, or None when there are none."""
    if x.ndim != 4 or x.shape[1] != len(mean):
        return None
    m, s = mean.astype(np.float64)[None, :, None, None], std.astype(np.float64)[None, :, None, None]
    p = np.rint((x.astype(np.float64) * s + m) * 255.0)
    if p.min() < 0 or p.max() > 255:
        return None
    p = p.astype(np.uint8)
    return p if np.array_equal(_normalize(p, mean, std), x) else None


def save_eval_data(path: str | Path, splits: dict, mean, std) -> dict:
    """Write ``splits`` (name -> object with ``.x`` float32 NCHW, ``.labels`` or None and,
    optionally, ``.sources``: the source of each sample).

    Returns ``{split: "pixels" | "float32"}``, how each split was stored.
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    arrays: dict[str, np.ndarray] = {"splits": np.array(list(splits)), "mean": mean, "std": std}
    how = {}
    for name, d in splits.items():
        x = np.asarray(d.x)
        pix = _to_pixels(x, mean, std) if x.dtype == np.float32 else None
        if pix is not None:
            arrays[f"{name}_pixels"], how[name] = pix, "pixels"
        else:
            arrays[f"{name}_x"], how[name] = x.astype(np.float32), "float32"
        if d.labels is not None:
            arrays[f"{name}_y"] = np.asarray(d.labels, np.int64)
        sources = getattr(d, "sources", None)
        if sources is not None and len(sources) == len(x):
            arrays[f"{name}_groups"] = group_index(np.asarray([str(v) for v in sources])).astype(np.int64)
    np.savez(path, **arrays)
    return how


def load_eval_data(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(float32 NCHW inputs, int64 labels or None, source ids or None) of ``split`` from ``eval_data.npz``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = [str(s) for s in z["splits"]]
            if split not in stored:
                raise BundleError(f"{str(path)!r} holds splits {stored}, not {split!r}.")
            if f"{split}_pixels" in z:
                x = _normalize(z[f"{split}_pixels"], z["mean"].astype(np.float32), z["std"].astype(np.float32))
            else:
                x = np.ascontiguousarray(z[f"{split}_x"].astype(np.float32))
            y = z[f"{split}_y"].astype(np.int64) if f"{split}_y" in z else None
            g = z[f"{split}_groups"].astype(np.int64) if f"{split}_groups" in z else None
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"{str(path)!r} is not a readable eval_data.npz: {e}.") from e
    return x, y, g


def load_user_data(path: str | Path, rt) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``--data PATH``: (inputs, labels or None, description).

    A directory of images in sub-folders named by integer class index (labelled), a flat
    directory of images (unlabelled), or a ``.npz`` with ``x`` (float32 ``(N, C, H, W)``,
    already preprocessed) and optional ``y`` (integer labels).
    """
    from moqe_compile.tasks.image.preprocess import list_images

    p = Path(path)
    if not p.exists():
        raise InputError(f"--data {str(p)!r} does not exist.")
    if p.is_dir():
        subdirs = sorted(d for d in p.iterdir() if d.is_dir())
        if not subdirs:
            _, x = rt.load_inputs(p)
            return x, None, f"{p} ({len(x)} unlabelled images)"
        xs, ys = [], []
        for d in subdirs:
            if not d.name.isdigit():
                raise InputError(f"class folder {str(d)!r} must be named by an integer class index.")
            if not list_images(d):
                continue
            _, x = rt.load_inputs(d)
            xs.append(x)
            ys.append(np.full(len(x), int(d.name), np.int64))
        if not xs:
            raise InputError(f"--data {str(p)!r}: its class folders hold no images.")
        y = np.concatenate(ys)
        _check_labels(y, rt, p)
        return np.concatenate(xs), y, f"{p} ({len(y)} images in {len(xs)} class folders)"
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z:
                    raise InputError(f"--data {str(p)!r} has arrays {sorted(z.files)}; it needs 'x' (and optionally 'y').")
                x, y = z["x"], (z["y"] if "y" in z else None)
        except ValueError as e:
            raise InputError(f"--data {str(p)!r} is not a plain .npz file: {e}.") from e
        shape = rt.preprocess.input_shape
        if x.dtype != np.float32 or x.ndim != 4 or tuple(x.shape[1:]) != shape or len(x) == 0:
            raise InputError(f"--data {str(p)!r}: x has shape {tuple(x.shape)} and dtype {x.dtype}; expected "
                             f"float32 (N, {shape[0]}, {shape[1]}, {shape[2]}) preprocessed inputs, N >= 1.")
        if y is not None:
            if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
                raise InputError(f"--data {str(p)!r}: y has shape {tuple(y.shape)} and dtype {y.dtype}; "
                                 f"expected integer labels of shape ({len(x)},).")
            y = y.astype(np.int64)
            _check_labels(y, rt, p)
        return np.ascontiguousarray(x), y, f"{p} ({len(x)} samples, {'labelled' if y is not None else 'unlabelled'})"
    raise InputError(f"--data {str(p)!r} must be 'test', 'router_val', a directory of images or a .npz file.")


def _check_labels(y: np.ndarray, rt, p: Path) -> None:
    c = rt.manifest["task"]["num_classes"]
    if y.min() < 0 or y.max() >= c:
        raise InputError(f"--data {str(p)!r}: labels range over [{y.min()}, {y.max()}]; the model has {c} classes.")
