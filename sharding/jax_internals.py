"""Every private jax API the project calls, each behind one wrapper, so a jax upgrade breaks here.

Two things the project needs have no public jax API (checked against jax 0.10.2):

  * whether jax has started its backends, so the simulated CPU device count (launch/run/devices.py)
    is set before it is too late: `jax._src.xla_bridge.backends_are_initialized`;
  * splash attention's backward kernels fed someone else's residuals, so ring attention
    (sharding/ring_splash.py) takes each block's gradient against the whole ring's output and
    log-sum-exp: `splash_attention_kernel._splash_attention_bwd`, the kernel object's saved
    settings and mask infos, and the layout of its residuals.

Each wrapper imports the private name when first called and checks its signature; when the name is
missing or changed it raises `JaxInternalsError`, one message naming the installed jax, the private
name and what the project needed it for. Callers import from here only; `missing()` lists what
does not resolve (tests/test_jax_internals.py asserts it is empty).
"""

import functools
import importlib
import inspect
import typing

CHECKED_AGAINST = "0.10.2"
_SPLASH_KERNEL_MODULE = "jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel"
# Called positionally, so the names and their order are the contract.
_SPLASH_BWD_PARAMS = ("save_residuals", "mask_value", "is_mqa", "block_sizes", "residual_checkpoint_name",
                      "mask_function", "attn_logits_soft_cap", "interpret", "res", "do")
# (q, k, v, segment_ids, sinks, out, logsumexp, dq_mask_info, dkv_mask_info)
_SPLASH_RESIDUALS = 9
# (fwd_mask_info, dq_mask_info, dkv_mask_info, dq, dk, dv, segment_ids, sinks)
_SPLASH_BWD_OUTPUTS = 8
_SPLASH_KERNEL_SETTINGS = ("mask_value", "is_mqa", "block_sizes", "mask_function", "attn_logits_soft_cap",
                           "interpret")


class JaxInternalsError(RuntimeError):
  """A private jax API the project relies on is missing or changed in the installed jax."""


def _broken(name: str, needed_for: str, problem: str) -> JaxInternalsError:
  import jax  # not at import time: launch/run/devices.py must be importable before jax is configured
  return JaxInternalsError(
      f"jax {jax.__version__}: {name} {problem}; shardlm needs it to {needed_for}. It was written "
      f"against jax {CHECKED_AGAINST}: adapt sharding/jax_internals.py or install jax=={CHECKED_AGAINST}.")


def _resolve(module: str, name: str, params: tuple[str, ...], needed_for: str):
  """`module.name`, checked to take exactly `params` in order; JaxInternalsError otherwise."""
  full = f"{module}.{name}"
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise _broken(full, needed_for, f"is missing ({e})") from e
  have = tuple(inspect.signature(fn).parameters)
  if have != params:
    raise _broken(full, needed_for, f"takes ({', '.join(have)}), not ({', '.join(params)})")
  return fn


_BACKENDS_NEED = "tell whether jax has started its devices before it sets the simulated CPU device count"
_SPLASH_NEED = ("take splash attention's gradient against a whole ring's output and log-sum-exp "
                "(ring attention with model.attention=splash, sharding/ring_splash.py)")


@functools.cache
def _backends_are_initialized():
  return _resolve("jax._src.xla_bridge", "backends_are_initialized", (), _BACKENDS_NEED)


@functools.cache
def _splash_attention_bwd():
  fn = _resolve(_SPLASH_KERNEL_MODULE, "_splash_attention_bwd", _SPLASH_BWD_PARAMS, _SPLASH_NEED)
  residuals = getattr(importlib.import_module(_SPLASH_KERNEL_MODULE), "SplashResidualsType", None)
  if residuals is None or len(typing.get_args(residuals)) != _SPLASH_RESIDUALS:
    raise _broken(f"{_SPLASH_KERNEL_MODULE}.SplashResidualsType", _SPLASH_NEED,
                  f"is not a tuple of {_SPLASH_RESIDUALS} (q, k, v, segment ids, sinks, out, logsumexp, "
                  "dq and dkv mask infos)")
  return fn


def backends_started() -> bool:
  """True when this process's jax has started a backend (its device count is then fixed).

  Takes nothing; raises JaxInternalsError when the installed jax no longer has the private function.
  """
  return _backends_are_initialized()()


def _splash_kernel_parts(kernel):
  """(settings dict, dq mask info, dkv mask info) of a `make_splash_mqa` kernel."""
  try:
    settings = {key: kernel.kwargs[key] for key in _SPLASH_KERNEL_SETTINGS}
    return settings, kernel.dq_mask_info, kernel.dkv_mask_info
  except (AttributeError, KeyError) as e:
    raise _broken("SplashAttentionKernel", _SPLASH_NEED,
                  f"no longer keeps .kwargs[{', '.join(_SPLASH_KERNEL_SETTINGS)}], .dq_mask_info and "
                  f".dkv_mask_info ({e!r})") from e


def _collapse(info):
  """What splash's own entry point (`_splash_attention`) does to a mask info before its kernels."""
  if info is None or info.partial_mask_blocks is None:
    return info
  return info._replace(partial_mask_blocks=info.partial_mask_blocks.reshape(
      -1, *info.partial_mask_blocks.shape[-2:]))


def splash_mqa_backward(kernel, q_RxLxK, k_SxK, v_SxK, segment_ids, out_RxLxK, lse_RxL, dout_RxLxK):
  """Gradients of one MQA splash call taken against given residuals: (dq [R, L, K], dk [S, K], dv [S, K]).

  `kernel` from `splash_attention.make_splash_mqa(...)` with backward block sizes; q (already scaled
  as the kernel saw it), k, v in the kernel's layout; `segment_ids` a `splash_attention.SegmentIds`
  or None; `out` [R, L, K] and `lse` [R, L] the output and log-sum-exp to differentiate against (for
  a ring, the whole ring's, so the kernel uses the global softmax); `dout` the output's cotangent.
  Dtypes are the kernel's. Raises JaxInternalsError when the installed jax changed the private API.
  """
  bwd = _splash_attention_bwd()
  settings, dq_info, dkv_info = _splash_kernel_parts(kernel)
  residuals = (q_RxLxK, k_SxK, v_SxK, segment_ids, None, out_RxLxK, lse_RxL, _collapse(dq_info),
               _collapse(dkv_info))
  grads = bwd(False, settings["mask_value"], settings["is_mqa"], settings["block_sizes"], None,
              settings["mask_function"], settings["attn_logits_soft_cap"], settings["interpret"],
              residuals, dout_RxLxK)
  if len(grads) != _SPLASH_BWD_OUTPUTS:
    raise _broken(f"{_SPLASH_KERNEL_MODULE}._splash_attention_bwd", _SPLASH_NEED,
                  f"returns {len(grads)} values, not {_SPLASH_BWD_OUTPUTS} (three mask infos, dq, dk, dv, "
                  "segment ids, sinks)")
  return grads[3], grads[4], grads[5]


def missing() -> list[str]:
  """One line per private jax API that does not resolve on the installed jax; [] when all do."""
  problems = []
  for resolve in (_backends_are_initialized, _splash_attention_bwd):
    try:
      resolve()
    except JaxInternalsError as e:
      problems.append(str(e))
  return problems
