"""Every jitted program a run or a command uses, built from the run plan, and only here.

    plan ──► train_step, eval_step       the training run, launch.bench, launch.memory, sweeps, aot
         ──► forward                     frozen forwards: calibration (int8, structured pruning), scoring
         ──► serving_params, generation  launch.generate, a checkpoint's .generate(), launch.compile
                                         (prefill and decode), launch.bench_decode

Each program is jitted with the plan's shardings (parameters by the rule table, batches over the data
axes) and called with the plan's tracing hooks installed (`Program`): the activation constraint, the
per-device wrapper of kernels GSPMD cannot split, and how attention crosses sequence shards. The hooks
carry how to reach the mesh, never a decision: kernels, sequence layout and strategy are in the model's
own attention plan (its graphdef), which the plan made. So what `launch.compile` compiles for a
topology is, call for call, what the run or `launch.generate` runs on those devices.

Shape suffixes: B batch, L length, P prompt width, N new tokens, V vocabulary.
"""

import contextlib
import dataclasses
import functools
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from launch.run import state as ts
from launch.run.plan import RunPlan
from launch.run import step as step_lib
from launch.run.step import LossHook, batch_sharding
from lm import attention as attention_lib
from lm import axes, decoding
from lm.sampling import check_sampling_args
from lm.serving import serving_params as serving_layout
from lm.transformer import cache_length, init_cache
from sharding import rules as rules_lib
from sharding import sequence as sequence_lib


def activation_constraint(mesh: Mesh, rules: rules_lib.Rules):
  """The constraint function lm.axes.constrain calls while a program is traced."""
  def constrain(x, names):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, rules_lib.logical_to_spec(names, rules)))
  return constrain


def per_shard_map(mesh: Mesh, rules: rules_lib.Rules):
  """The wrapper lm.axes.per_shard calls: a shard_map by logical names (kernels GSPMD cannot split)."""
  def wrap(fn, in_names, out_names):
    specs = lambda names: rules_lib.logical_to_spec(names, rules)
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs(n) for n in in_names),
                         out_specs=specs(out_names), check_vma=False)
  return wrap


class Program:
  """A jitted function of the plan, called (or lowered, or traced) with the plan's tracing hooks.

  `bound_args` are trailing arguments passed on every call (a LossHook's extra inputs).
  """

  def __init__(self, jitted, plan: RunPlan, bound_args: tuple = ()):
    self.jitted, self.plan, self.bound_args = jitted, plan, bound_args
    self._constraint = activation_constraint(plan.mesh, plan.rules)
    self._per_shard = per_shard_map(plan.mesh, plan.rules)
    self._across_shards = (None if plan.sequence.shards == 1 else sequence_lib.sequence_attention_fn(
        plan.mesh, plan.rules, attention_lib.xla_attention))

  def _hooks(self):
    stack = contextlib.ExitStack()
    stack.enter_context(axes.use_constraint(self._constraint))
    stack.enter_context(axes.use_per_shard(self._per_shard))
    stack.enter_context(axes.use_sequence_attention(self._across_shards))
    return stack

  def __call__(self, *args):
    with self._hooks():
      return self.jitted(*args, *self.bound_args)

  def lower(self, *args):
    with self._hooks():
      return self.jitted.lower(*args, *self.bound_args)

  def trace(self, *args):
    with self._hooks():
      return self.jitted.trace(*args, *self.bound_args)


# ---- training ----

def train_step(plan: RunPlan, loss_hook: LossHook | None = None) -> Program:
  """The plan's train step, compiled on first call, with explicit shardings and the state donated.

  Called as step(state, batch) -> (state, metrics). Everything comes from the plan: the model and its
  kernels, optimizer, gradient accumulation, train.nonfinite, the sequence layout (zigzag under the
  ring, read from the model's own plan). A `loss_hook` replaces the loss; its model calls read the
  natural order (`RunPlan.natural_order_mdef`), and its extra inputs are passed for you.
  """
  cfg = plan.cfg
  step = functools.partial(step_lib.train_step, mdef=plan.mdef, tx=plan.tx, schedule=plan.schedule,
                           accum_steps=cfg.train.grad_accum_steps, loss_fn=loss_hook and loss_hook.fn,
                           skip_nonfinite=cfg.train.nonfinite == "skip_step")
  in_shardings = (plan.shardings, batch_sharding(plan.mesh, plan.rules))
  if loss_hook is not None:
    in_shardings += (loss_hook.extra_shardings,)
  jitted = jax.jit(step, in_shardings=in_shardings, out_shardings=(plan.shardings, None),
                   donate_argnums=(0,))
  return Program(jitted, plan, () if loss_hook is None else (loss_hook.extra,))


def eval_step(plan: RunPlan) -> Program:
  """The plan's eval step: step(params, batch) -> {"loss_sum", "tokens"} over sharded inputs."""
  jitted = jax.jit(functools.partial(step_lib.eval_step, mdef=plan.mdef),
                   in_shardings=(plan.shardings.params, batch_sharding(plan.mesh, plan.rules)))
  return Program(jitted, plan)


# ---- frozen forwards ----

def forward(plan: RunPlan, fn: Callable, mdef: ts.ModelDef | None = None) -> Program:
  """A frozen forward program: program(params, *args) = `fn(mdef, params, *args)`, where `fn`
  rebuilds the model `mdef` (default: the plan's, with the plan's kernels) from `params`
  (`mdef.bind(params)`, or `nnx.merge` with extra state such as calibration ranges).

  Arrays come placed: parameters restored with the plan's shardings (`ts.param_shardings`), batches
  with `batch_sharding`; jit keeps their layouts. Calibration (compress/), scoring and the
  reproduction scripts run their forwards through this.
  """
  mdef = mdef or plan.mdef
  return Program(jax.jit(functools.partial(fn, mdef)), plan)


def _logits(mdef: ts.ModelDef, params, tokens_BxL):
  return mdef.bind(params)(tokens_BxL)


def logits(plan: RunPlan, mdef: ts.ModelDef | None = None) -> Program:
  """program(params, tokens_BxL) -> float32 logits [B, L, V] of the model (`forward`)."""
  return forward(plan, _logits, mdef)


# ---- generation ----

def serving_mdef(plan: RunPlan) -> ts.ModelDef:
  """The plan's model in the serving layout (one tree per layer, lm/serving.py), same kernels."""
  return ts.model_def(plan.cfg.model, None, plan.mdef.attention, per_layer=True)


def serving_shardings(plan: RunPlan) -> dict:
  """A NamedSharding per serving parameter, from the plan's rule table (the training names minus `layers`)."""
  return ts.param_shardings(serving_mdef(plan), plan.mesh, plan.rules)


def serving_params(plan: RunPlan, params: dict) -> dict:
  """The plan's (stacked, sharded) `params` laid out for serving: float matrices in the compute
  dtype, one tree per layer, each placed by the plan's rules. The stacked `params` are left as they
  are; free them once this returns if they are not needed."""
  dtype = plan.cfg.model.compute_dtype
  return jax.jit(functools.partial(serving_layout, dtype=dtype), out_shardings=serving_shardings(plan))(params)


def abstract_serving_params(plan: RunPlan) -> dict:
  """The serving parameters as ShapeDtypeStructs with their shardings (what `serving_params` returns)."""
  dtype, shardings = plan.cfg.model.compute_dtype, serving_shardings(plan)
  shapes = jax.eval_shape(functools.partial(serving_layout, dtype=dtype), plan.mdef.abstract_params)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def rows_sharding(plan: RunPlan) -> NamedSharding:
  """Sharding of a per-row array [B]: split like a batch's rows."""
  return NamedSharding(plan.mesh, PartitionSpec(batch_sharding(plan.mesh, plan.rules).spec[0]))


def batch_shards(plan: RunPlan) -> int:
  """Over how many devices a batch's rows are split (the mesh axes `batch` maps to)."""
  axes_ = batch_sharding(plan.mesh, plan.rules).spec[0]
  names = () if axes_ is None else (axes_,) if isinstance(axes_, str) else tuple(axes_)
  return int(np.prod([plan.mesh.shape[n] for n in names])) if names else 1


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How each next token is chosen (lm/sampling.py): temperature 0 is greedy."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_ids: tuple[int, ...] = ()


class Generation:
  """The two programs of generation for one plan: `prefill` (prompts into a new KV cache) and
  `decode` (the cached decode loop), as `launch.generate` runs them and `launch.compile` compiles them.

    prefill(params, prompt_BxP, lengths_B) -> (float32 logits [B, V] of each row's last token, cache)
    decode(params, cache, logits_BxV, lengths_B, rng) -> (int32 new tokens [B, max_new_tokens], cache)

  Decode donates its input cache and returns it updated in place (one cache in memory, not two).

  `params` are `serving_params(plan, ...)`; prompts are left-padded (`lm.generate.left_pad`), rows
  split over the data axes (a batch is padded to a multiple of `batch_shards` rows and cut back).
  `layout="stacked"` runs the training layout instead (the plan's own parameters, for comparisons:
  launch.bench_decode); `donate_cache=False` keeps decode's input cache (a benchmark reusing one).
  """

  def __init__(self, plan: RunPlan, *, max_new_tokens: int, sampling: Sampling = Sampling(),
               layout: str = "serving", donate_cache: bool = True):
    check_sampling_args(sampling.temperature, sampling.top_k, sampling.top_p)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens}: must be at least 1.")
    if layout not in ("serving", "stacked"):
      raise ValueError(f"layout={layout!r}: choose serving or stacked.")
    self.plan, self.max_new_tokens, self.sampling = plan, max_new_tokens, sampling
    mdef = serving_mdef(plan) if layout == "serving" else plan.mdef
    graphdef, params = mdef.graphdef, ts.param_shardings(mdef, plan.mesh, plan.rules)
    # Prompts and new tokens [B, P]: rows split like a batch's, each row whole (a prompt's width
    # need not divide a sequence axis; the model's constraints place what it computes).
    rows = rows_sharding(plan)
    tokens = NamedSharding(plan.mesh, PartitionSpec(rows.spec[0], None))
    self.tokens_sharding, self.rows_sharding = tokens, rows

    def prefill(params, prompt_BxP, lengths_B):
      cache_len = prompt_BxP.shape[1] + max_new_tokens
      return decoding.prefill(decoding.build_model(graphdef, params), prompt_BxP, cache_len, lengths_B)

    def decode(params, cache, logits_BxV, lengths_B, rng):
      sample = decoding.sampler(rng, temperature=sampling.temperature, top_k=sampling.top_k,
                                top_p=sampling.top_p)
      prompt_len = cache_length(cache) - max_new_tokens
      return decoding.continue_decoding(decoding.build_model(graphdef, params), cache, logits_BxV,
                                        prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                        sample=sample, eos_id=sampling.eos_ids or None,
                                        prompt_lengths_B=lengths_B)

    # The cache and the logits between the two programs are placed by the rule table too, so the
    # decode program is the same whether its inputs come from a prefill or are described (aot).
    self.cache_shardings = cache_shardings(plan, per_layer=layout == "serving")
    logits = NamedSharding(plan.mesh, rules_lib.logical_to_spec(("batch", "vocab"), plan.rules))
    self.logits_sharding = logits
    self.prefill = Program(jax.jit(prefill, in_shardings=(params, tokens, rows),
                                   out_shardings=(logits, self.cache_shardings)), plan)
    self.decode = Program(jax.jit(decode, in_shardings=(params, self.cache_shardings, logits, rows, None),
                                  out_shardings=(tokens, self.cache_shardings),
                                  donate_argnums=(1,) if donate_cache else ()), plan)

  def __call__(self, params, prompt_BxP: np.ndarray, rng: jax.Array, lengths_B: np.ndarray) -> np.ndarray:
    """Generates for left-padded prompts [B, P] of `lengths_B`; returns int32 [B, P + max_new_tokens]
    (the prompt, then the new tokens) on the host."""
    prompt_BxP, lengths_B = np.asarray(prompt_BxP, np.int32), np.asarray(lengths_B, np.int32)
    batch = prompt_BxP.shape[0]
    extra = -batch % batch_shards(self.plan)
    if extra:  # rows every device can hold; the copies are cut off again below
      prompt_BxP = np.concatenate([prompt_BxP, np.repeat(prompt_BxP[:1], extra, 0)])
      lengths_B = np.concatenate([lengths_B, np.repeat(lengths_B[:1], extra)])
    decoding.check_generate_args(prompt_BxP.shape, self.max_new_tokens, self.plan.cfg.model.max_seq_len)
    decoding.check_prompt_lengths(lengths_B, prompt_BxP.shape[0], prompt_BxP.shape[1])
    logits_BxV, cache = self.prefill(params, prompt_BxP, lengths_B)
    new_BxN, _ = self.decode(params, cache, logits_BxV, lengths_B, rng)
    return np.concatenate([prompt_BxP, np.asarray(new_BxN)], axis=1)[:batch]


def cache_shardings(plan: RunPlan, per_layer: bool) -> dict:
  """A NamedSharding per KV-cache array of the plan's model (stacked, or per layer for serving),
  from the rule table and the cache's logical names (lm.decoding.cache_logical_names)."""
  shapes = jax.eval_shape(lambda: init_cache(plan.cfg.model, 1, 1, per_layer=per_layer))
  place = lambda names: NamedSharding(plan.mesh, rules_lib.logical_to_spec(names, plan.rules))
  return jax.tree.map(place, decoding.cache_logical_names(shapes), is_leaf=lambda x: isinstance(x, tuple))


def text_generator(plan: RunPlan, params, *, max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0) -> Callable[[Sequence[int]], Callable]:
  """What lm.generate.stream_text takes: `build(eos_ids) -> fn(prompt_BxP, rng, lengths_B)`, running
  this plan's `Generation` over `params` (serving params, `serving_params`)."""
  def build(eos_ids):
    generation = Generation(plan, max_new_tokens=max_new_tokens,
                            sampling=Sampling(temperature, top_k, top_p, tuple(eos_ids)))
    return functools.partial(generation, params)
  return build
