"""Post-training int8 quantization of a checkpoint into a new checkpoint, end to end (the command is
`python -m launch.quantize`; docs/quantization.md describes the method).

The output directory is an ordinary checkpoint (params + meta, the config saying model.quant=...),
so `launch.eval`, `launch.generate` and `launch.export` take it like a float one.
"""

import dataclasses

import jax
import numpy as np

from compress import calibrate as calibrate_lib
from compress import quantize as quantize_lib
from launch.run import checkpoint as ckpt_lib
from launch.run import inputs
from launch.run import state as ts
from launch.run.restore import LoadedModel, load_checkpoint
from launch.storage import paths
from lm.config import DENSE_LAYERS
from lm.data import loader


def checkpoint_bytes(checkpoint_dir: str, step: int, item: str = "params") -> int:
  """Bytes on disk (or in the bucket) of one item (default: the parameters) of one checkpoint step."""
  root = paths.join(checkpoint_dir, str(step), item)
  if not paths.isdir(root):
    raise ckpt_lib.CheckpointError(f"No '{item}' in {checkpoint_dir} step {step}.")
  return paths.tree_bytes(root)


def calibration_data(loaded: LoadedModel, num_batches: int) -> list[np.ndarray]:
  """The first `num_batches` training batches (int tokens [B, L]) of the run's corpus and seed."""
  cfg = loaded.cfg
  it = loader.train_iterator_for(inputs.local_data(cfg.data), loaded.tokenizer,
                                 global_batch_size=cfg.train.global_batch_size,
                                 seed=cfg.seed)
  return [np.asarray(next(it)["inputs"]) for _ in range(num_batches)]


def _check_args(mode: str, skip: tuple[str, ...], smooth: bool, alpha: float, calibration_batches: int,
                out_dir: str) -> None:
  if mode not in quantize_lib.MODES:
    raise ValueError(f"mode={mode!r}: choose one of {list(quantize_lib.MODES)}.")
  for name in skip:
    if name not in DENSE_LAYERS:
      raise ValueError(f"skip list names {name!r}, which is not a dense layer; choose from "
                       f"{list(DENSE_LAYERS)}.")
  if mode == "w8a8" and smooth:
    if calibration_batches < 1:
      raise ValueError(f"calibration_batches={calibration_batches}: smoothing needs at least one "
                       "calibration batch; pass --calibration_batches 8, or --nosmooth.")
    if not 0 <= alpha <= 1:
      raise ValueError(f"alpha={alpha}: the smoothing strength must be in [0, 1] (0.5 is standard).")
  if not out_dir:
    raise ValueError("out_dir is required: the directory the quantized checkpoint is written to.")
  if paths.isdir(out_dir) and any(name.isdigit() for name in paths.listdir(out_dir)):
    raise ValueError(f"{out_dir} already holds a checkpoint; choose a new --out_dir (nothing was "
                     "overwritten).")


def quantize_checkpoint(checkpoint_dir: str, out_dir: str, *, mode: str, step: int | None = None,
                        quantize_embedding: bool = False, skip: tuple[str, ...] = (),
                        smooth: bool = True, alpha: float = 0.5, calibration_batches: int = 8,
                        devices: list | None = None) -> dict:
  """Quantizes the float checkpoint in `checkpoint_dir` into `out_dir`; returns a report dict.

  Every argument is checked before anything is loaded or compiled. The report holds the mode, the
  settings, and the parameter bytes of both checkpoints.
  """
  _check_args(mode, tuple(skip), smooth, alpha, calibration_batches, out_dir)
  loaded = load_checkpoint(checkpoint_dir, step, devices)
  quant_cfg = quantize_lib.quantized_config(loaded.cfg.model, mode, embedding=quantize_embedding,
                                            skip=tuple(skip))
  ranges = None
  if mode == "w8a8" and smooth:
    batches = calibration_data(loaded, calibration_batches)
    ranges = calibrate_lib.calibrate(loaded.plan, loaded.params, batches)

  shardings = ts.param_shardings(ts.model_def(quant_cfg, None, loaded.plan.attention), loaded.plan.mesh,
                                 loaded.plan.rules)
  convert = lambda params, ranges: quantize_lib.quantize_params(params, quant_cfg, ranges, alpha)
  params = jax.jit(convert, out_shardings=shardings)(loaded.params, ranges)

  settings = {"mode": mode, "quantize_embedding": quantize_embedding, "skip": list(skip),
              "smooth": bool(ranges is not None), "alpha": alpha if ranges is not None else None,
              "calibration_batches": calibration_batches if ranges is not None else 0,
              "source": paths.normalize(checkpoint_dir), "source_step": loaded.step}
  cfg = dataclasses.replace(loaded.cfg, model=quant_cfg)
  checkpointer = ckpt_lib.Checkpointer(out_dir, keep=1, async_save=False)
  checkpointer.save_params(loaded.step, params, {"config": cfg.to_dict(), "quantization": settings})
  checkpointer.close()
  float_bytes = checkpoint_bytes(checkpoint_dir, loaded.step)
  quant_bytes = checkpoint_bytes(out_dir, loaded.step)
  return {**settings, "out_dir": paths.normalize(out_dir), "float_param_bytes": float_bytes,
          "quantized_param_bytes": quant_bytes, "compression": float_bytes / quant_bytes}
