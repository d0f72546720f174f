"""Calibration for SmoothQuant: max |x| of every input channel of every dense layer, over real batches.

The float model is rebuilt with `model.quant="observe"` (lm/quant.py's ObservedLinear records its
inputs' ranges), so the statistics come from the same model code that serves, with no hooks; it
runs on the run plan's devices with the plan's kernels (launch/run/programs.forward).
"""

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from launch.run import programs
from launch.run import state as ts
from lm.config import ModelConfig
from lm.quant import InputRange
from lm.model_def import define

Params = dict[str, Any]

nnx.use_eager_sharding(False)


def _fold(mdef, params, ranges, tokens_BxL):
  model = nnx.merge(mdef.graphdef, params, ranges)
  model(tokens_BxL)
  return nnx.to_pure_dict(nnx.state(model, InputRange))


def make_observer(plan):
  """The calibration program `fn(float_params, ranges, tokens_BxL) -> ranges` (one batch folded in)
  of the plan's model recording its inputs' ranges, on the plan's devices with the plan's kernels.

  `ranges` is a tree (one [*S, *I] float32 array per dense layer); start from `zero_ranges(cfg)`.
  """
  observe_cfg = dataclasses.replace(plan.cfg.model, quant="observe")
  return programs.forward(plan, _fold, ts.model_def(observe_cfg, None, plan.attention))


def zero_ranges(cfg: ModelConfig) -> Params:
  """All-zero input ranges for every dense layer of `cfg`'s model."""
  observe_cfg = dataclasses.replace(cfg, quant="observe")
  shapes = nnx.to_pure_dict(nnx.state(define(observe_cfg).abstract, InputRange))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def calibrate(plan, float_params: Params, batches: Iterable[np.ndarray]) -> Params:
  """Returns max |x| per input channel of every dense layer of the plan's (float) model over
  `batches` of int tokens [B, L].

  Raises ValueError when `batches` is empty: smoothing from no data would silently do nothing.
  """
  cfg = plan.cfg.model
  if cfg.quant != "none":
    raise ValueError(f"Calibration runs the float model; got model.quant={cfg.quant!r}.")
  fold = make_observer(plan)
  ranges, count = zero_ranges(cfg), 0
  for tokens_BxL in batches:
    ranges = fold(float_params, ranges, jnp.asarray(tokens_BxL, jnp.int32))
    count += 1
  if count == 0:
    raise ValueError("Calibration got zero batches; SmoothQuant needs activation ranges from real "
                     "text. Pass --calibration_batches >= 1 (8 is plenty for the demo model).")
  return ranges
